//! Time: `ngx.now`, `ngx.time`, `ngx.today`, `ngx.update_time`, `ngx.localtime`, `ngx.utctime`,
//! `ngx.http_time`, `ngx.cookie_time`, `ngx.parse_http_time`. Local time is UTC: the sandbox
//! does not read the host's time zone (containers run in UTC anyway).
//!
//! As in nginx, the time Lua reads is the worker's cached time: read once per run of Lua (each
//! time a handler, timer or light thread starts or resumes after a wait), so that it stays the
//! same through a run unless `ngx.update_time()` reads the clock again. Code written for
//! OpenResty counts on that (two `ngx.now()` a few instructions apart are equal).

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

thread_local! {
    static CACHED: Cell<Option<Duration>> = const { Cell::new(None) };
}

/// Lets the next read of the time read the clock: a run of Lua starts.
pub(crate) fn new_turn() {
    CACHED.set(None);
}

use mlua::{Lua, Table, Value};

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.raw_set("now", lua.create_function(|_, ()| Ok((now().as_secs_f64() * 1000.0).floor() / 1000.0))?)?;
    ngx.raw_set("time", lua.create_function(|_, ()| Ok(now().as_secs()))?)?;
    ngx.raw_set(
        "update_time",
        lua.create_function(|_, ()| {
            new_turn();
            Ok(())
        })?,
    )?;
    ngx.raw_set("today", lua.create_function(|_, ()| Ok(civil(secs_now()).date()))?)?;
    ngx.raw_set("localtime", lua.create_function(|_, ()| Ok(civil(secs_now()).date_time()))?)?;
    ngx.raw_set("utctime", lua.create_function(|_, ()| Ok(civil(secs_now()).date_time()))?)?;
    ngx.raw_set("http_time", lua.create_function(|_, secs: f64| Ok(http_time(to_secs(secs))))?)?;
    ngx.raw_set("cookie_time", lua.create_function(|_, secs: f64| Ok(cookie_time(to_secs(secs))))?)?;
    ngx.raw_set(
        "parse_http_time",
        lua.create_function(|_, text: String| {
            Ok(match httpdate::parse_http_date(&text) {
                Ok(t) => Value::Integer(
                    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0),
                ),
                Err(_) => Value::Nil,
            })
        })?,
    )?;
    Ok(())
}

fn now() -> Duration {
    CACHED.get().unwrap_or_else(|| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        CACHED.set(Some(now));
        now
    })
}

fn secs_now() -> i64 {
    i64::try_from(now().as_secs()).unwrap_or(0)
}

fn to_secs(secs: f64) -> i64 {
    #[allow(clippy::cast_possible_truncation)]
    let s = secs.floor() as i64;
    s
}

/// A UTC calendar time.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32,
}

/// Unix seconds to a UTC calendar time (Howard Hinnant's days-from-civil, inverted).
fn civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let small = |v: i64| u32::try_from(v).unwrap_or(0);
    Civil {
        year,
        month: small(month),
        day: small(day),
        hour: small(rem / 3600),
        minute: small(rem % 3600 / 60),
        second: small(rem % 60),
        // 1970-01-01 was a Thursday.
        weekday: small((days + 4).rem_euclid(7)),
    }
}

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

impl Civil {
    fn date(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    fn date_time(&self) -> String {
        format!("{} {:02}:{:02}:{:02}", self.date(), self.hour, self.minute, self.second)
    }

    fn names(&self) -> (&'static str, &'static str) {
        let day = DAYS.get(self.weekday as usize).copied().unwrap_or("Thu");
        let month = MONTHS.get(self.month.saturating_sub(1) as usize).copied().unwrap_or("Jan");
        (day, month)
    }
}

fn http_time(secs: i64) -> String {
    let c = civil(secs);
    let (day, month) = c.names();
    format!("{day}, {:02} {month} {:04} {:02}:{:02}:{:02} GMT", c.day, c.year, c.hour, c.minute, c.second)
}

fn cookie_time(secs: i64) -> String {
    let c = civil(secs);
    let (day, month) = c.names();
    format!(
        "{day}, {:02}-{month}-{:02} {:02}:{:02}:{:02} GMT",
        c.day,
        c.year.rem_euclid(100),
        c.hour,
        c.minute,
        c.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_match_nginx() {
        assert_eq!(http_time(1_290_079_655), "Thu, 18 Nov 2010 11:27:35 GMT");
        assert_eq!(cookie_time(1_290_079_655), "Thu, 18-Nov-10 11:27:35 GMT");
        assert_eq!(civil(0).date_time(), "1970-01-01 00:00:00");
        assert_eq!(civil(951_782_400).date(), "2000-02-29");
    }
}
