//! `ngx.shared.DICT`: dictionaries shared by all workers of a proxy.
//!
//! One store per dictionary, behind a mutex held only for the duration of one operation (never
//! across an await). Each dictionary belongs to the namespace of the LuaRoute that declares it;
//! Lua running for another namespace does not see it. Cluster-wide dictionaries (namespace `""`,
//! declared with the controller's `--shared-dict`) are seen from every namespace that does not
//! declare one of the same name.
//!
//! # Guarantees
//! - Bounded: a dictionary never holds more than its size in accounted bytes (key, value and a
//!   fixed per-entry overhead). `set`, `add`, `replace`, `incr` and the list pushes evict least
//!   recently used entries to make room and report `forcible = true` when a live entry had to go;
//!   the `safe_` variants only reclaim expired entries and fail with "no memory" instead.
//! - Values: strings, numbers, booleans (and lists of strings and numbers), with flags and TTLs.
//! - Data survives configuration changes for as long as the dictionary stays declared.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use mlua::{FromLuaMulti, IntoLuaMulti, Lua, Table, Value};

use crate::api::args::{Address, Returns, Scalar};

/// Accounted bytes of an entry besides its key and value (what nginx's slab spends per node).
const ENTRY_OVERHEAD: usize = 64;
const ITEM_OVERHEAD: usize = 16;
const MAX_KEY: usize = 65_535;

/// A value as stored.
#[derive(Clone, Debug)]
enum Stored {
    Str(Vec<u8>),
    Num(f64),
    Bool(bool),
    List(VecDeque<Item>),
}

#[derive(Clone, Debug)]
enum Item {
    Str(Vec<u8>),
    Num(f64),
}

#[derive(Debug)]
struct Entry {
    value: Stored,
    flags: u32,
    expires: Option<Instant>,
    /// Position in the LRU order.
    tick: u64,
    size: usize,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// Whether it has not expired, reading the clock only when it can (most entries never do).
    fn live(&self) -> bool {
        self.expires.is_none_or(|e| e > Instant::now())
    }
}

fn size_of(key: &[u8], value: &Stored) -> usize {
    let value = match value {
        Stored::Str(s) => s.len(),
        Stored::Num(_) | Stored::Bool(_) => 8,
        Stored::List(items) => {
            items.iter().map(|i| ITEM_OVERHEAD + if let Item::Str(s) = i { s.len() } else { 8 }).sum()
        }
    };
    ENTRY_OVERHEAD + key.len() + value
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Vec<u8>, Entry>,
    lru: BTreeMap<u64, Vec<u8>>,
    used: usize,
    tick: u64,
}

impl Inner {
    fn touch(&mut self, key: &[u8]) {
        let Inner { map, lru, tick, .. } = self;
        if let Some(entry) = map.get_mut(key) {
            most_recent(lru, tick, entry, key);
        }
    }

    /// Adds `delta` to a live number, which becomes the most recently used; its new value, or
    /// `None` when `key` holds no live number. One lookup, as `incr` is the hot path.
    fn bump(&mut self, key: &[u8], delta: f64) -> Option<f64> {
        let Inner { map, lru, tick, .. } = self;
        let entry = map.get_mut(key).filter(|e| e.live())?;
        let Stored::Num(n) = &mut entry.value else { return None };
        *n += delta;
        let value = *n;
        most_recent(lru, tick, entry, key);
        Some(value)
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let entry = self.map.remove(key)?;
        self.lru.remove(&entry.tick);
        self.used -= entry.size;
        Some(entry)
    }

    /// Makes room for `need` more bytes: expired entries first, then (unless `safe`) the least
    /// recently used live ones. Returns whether there is room and whether a live entry went.
    fn make_room(
        &mut self,
        need: usize,
        capacity: usize,
        safe: bool,
        keep: &[u8],
        evictions: &AtomicU64,
    ) -> (bool, bool) {
        if self.used + need <= capacity {
            return (true, false);
        }
        let now = Instant::now();
        let expired: Vec<Vec<u8>> =
            self.map.iter().filter(|(k, e)| e.expired(now) && k.as_slice() != keep).map(|(k, _)| k.clone()).collect();
        for key in expired {
            self.remove(&key);
        }
        let mut forcible = false;
        while self.used + need > capacity && !safe {
            let Some(key) = self.lru.values().find(|k| k.as_slice() != keep).cloned() else { break };
            self.remove(&key);
            evictions.fetch_add(1, Ordering::Relaxed);
            forcible = true;
        }
        (self.used + need <= capacity, forcible)
    }

    /// Stores `value` under `key`, replacing what was there.
    fn put(&mut self, key: &[u8], value: Stored, flags: u32, expires: Option<Instant>) {
        let size = size_of(key, &value);
        self.remove(key);
        self.tick += 1;
        self.lru.insert(self.tick, key.to_vec());
        self.used += size;
        self.map.insert(key.to_vec(), Entry { value, flags, expires, tick: self.tick, size });
    }
}

/// Makes `entry` (of `key`) the most recently used, unless it is already (a counter bumped again
/// and again): the key's copy moves to its new place in the order.
fn most_recent(lru: &mut BTreeMap<u64, Vec<u8>>, tick: &mut u64, entry: &mut Entry, key: &[u8]) {
    if entry.tick == *tick {
        return;
    }
    *tick += 1;
    let copy = lru.remove(&entry.tick).unwrap_or_else(|| key.to_vec());
    entry.tick = *tick;
    lru.insert(*tick, copy);
}

/// One dictionary.
#[derive(Debug)]
pub struct Dict {
    name: String,
    capacity: AtomicU64,
    inner: Mutex<Inner>,
    evictions: AtomicU64,
}

impl Dict {
    fn new(name: &str, capacity: u64) -> Self {
        Dict {
            name: name.to_owned(),
            capacity: AtomicU64::new(capacity),
            inner: Mutex::new(Inner::default()),
            evictions: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every operation restores the
        // invariants before it can panic), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn capacity(&self) -> usize {
        usize::try_from(self.capacity.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Live entries evicted to make room, since the dictionary was created.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

/// Every dictionary of a proxy, by (namespace, name).
#[derive(Debug, Default)]
pub struct SharedDicts {
    dicts: RwLock<HashMap<(String, String), Arc<Dict>>>,
    /// Changes whenever the set of dictionaries does: what workers check before using the
    /// dictionary objects they keep.
    generation: AtomicU64,
}

/// What the metrics report of one dictionary.
#[derive(Debug, Clone)]
pub struct DictStats {
    pub namespace: String,
    pub name: String,
    pub used_bytes: usize,
    pub capacity_bytes: usize,
    pub evictions: u64,
}

impl SharedDicts {
    pub fn new() -> Arc<Self> {
        Arc::new(SharedDicts::default())
    }

    /// Makes exactly these dictionaries exist: new ones are created, existing ones keep their
    /// data (with the new size), and ones no longer declared are dropped.
    pub fn configure(&self, declared: &[(String, String, u64)]) {
        let mut dicts = self.dicts.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = HashMap::with_capacity_and_hasher(declared.len(), foldhash::fast::RandomState::default());
        for (namespace, name, size) in declared {
            let key = (namespace.clone(), name.clone());
            let dict = match dicts.remove(&key) {
                Some(dict) => {
                    dict.capacity.store(*size, Ordering::Relaxed);
                    dict
                }
                None => Arc::new(Dict::new(name, *size)),
            };
            next.insert(key, dict);
        }
        *dicts = next;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A number that changes whenever [`SharedDicts::configure`] runs.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The dictionary `name` as Lua of `namespace` sees it: its namespace's own, else the
    /// cluster-wide one (namespace `""`).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Dict>> {
        let dicts = self.dicts.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        dicts
            .get(&(namespace.to_owned(), name.to_owned()))
            .or_else(|| dicts.get(&(String::new(), name.to_owned())))
            .cloned()
    }

    /// The names Lua of `namespace` finds dictionaries under: its own and the cluster-wide ones.
    pub fn names_seen_from(&self, namespace: &str) -> Vec<String> {
        let dicts = self.dicts.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut names: Vec<String> =
            dicts.keys().filter(|(ns, _)| ns.is_empty() || ns == namespace).map(|(_, name)| name.clone()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    pub fn stats(&self) -> Vec<DictStats> {
        let dicts = self.dicts.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stats: Vec<DictStats> = dicts
            .iter()
            .map(|((namespace, name), d)| DictStats {
                namespace: namespace.clone(),
                name: name.clone(),
                used_bytes: d.used(),
                capacity_bytes: d.capacity(),
                evictions: d.evictions(),
            })
            .collect();
        stats.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        stats
    }
}

/// The Lua face of a dictionary: `ngx.shared.NAME`.
pub(crate) struct DictHandle(pub(crate) Arc<Dict>);

fn key_of(value: Scalar) -> Result<Vec<u8>, &'static str> {
    let key = match value {
        Scalar::Str(s) => s,
        #[allow(clippy::cast_precision_loss)]
        Scalar::Int(i) => crate::api::format_number(i as f64).into_bytes(),
        Scalar::Num(n) => crate::api::format_number(n).into_bytes(),
        Scalar::Nil => return Err("nil key"),
        Scalar::Bool(_) | Scalar::Other => return Err("bad key type"),
    };
    if key.is_empty() {
        return Err("empty key");
    }
    if key.len() > MAX_KEY {
        return Err("key too long");
    }
    Ok(key)
}

fn stored_of(value: Scalar) -> Result<Option<Stored>, &'static str> {
    Ok(Some(match value {
        Scalar::Nil => return Ok(None),
        Scalar::Str(s) => Stored::Str(s),
        #[allow(clippy::cast_precision_loss)]
        Scalar::Int(i) => Stored::Num(i as f64),
        Scalar::Num(n) => Stored::Num(n),
        Scalar::Bool(b) => Stored::Bool(b),
        Scalar::Other => return Err("bad value type"),
    }))
}

fn to_lua(lua: &Lua, value: &Stored) -> mlua::Result<Value> {
    Ok(match value {
        Stored::Str(s) => Value::String(lua.create_string(s)?),
        Stored::Num(n) => Value::Number(*n),
        Stored::Bool(b) => Value::Boolean(*b),
        Stored::List(_) => return Err(mlua::Error::runtime("value is a list")),
    })
}

fn item_to_lua(lua: &Lua, item: &Item) -> mlua::Result<Value> {
    Ok(match item {
        Item::Str(s) => Value::String(lua.create_string(s)?),
        Item::Num(n) => Value::Number(*n),
    })
}

fn expiry(exptime: Option<f64>) -> Result<Option<Instant>, &'static str> {
    match exptime {
        Some(t) if t < 0.0 || !t.is_finite() => Err("bad \"exptime\" argument"),
        // No exptime, or 0: never expires.
        None | Some(0.0) => Ok(None),
        Some(t) => Ok(Some(Instant::now() + Duration::from_secs_f64(t))),
    }
}

fn multi<const N: usize>(values: [Value; N]) -> Returns {
    Returns::of(values)
}

fn text(lua: &Lua, s: &str) -> mlua::Result<Value> {
    Ok(Value::String(lua.create_string(s)?))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Set,
    SafeSet,
    Add,
    SafeAdd,
    Replace,
}

impl DictHandle {
    /// set, safe_set, add, safe_add, replace: `ok, err, forcible`.
    fn store(
        &self,
        lua: &Lua,
        mode: Mode,
        (key, value, exptime, flags): (Scalar, Scalar, Option<f64>, Option<u32>),
    ) -> mlua::Result<Returns> {
        let fail = |message: &str, forcible: bool| -> mlua::Result<Returns> {
            Ok(multi([Value::Boolean(false), text(lua, message)?, Value::Boolean(forcible)]))
        };
        let key = match key_of(key) {
            Ok(k) => k,
            Err(message) => return Ok(multi([Value::Nil, text(lua, message)?])),
        };
        let stored = match stored_of(value) {
            Ok(None) if matches!(mode, Mode::Add | Mode::SafeAdd | Mode::Replace) => {
                return fail("attempt to add or replace nil values", false);
            }
            Ok(s) => s,
            Err(message) => return fail(message, false),
        };
        let expires = expiry(exptime).map_err(mlua::Error::runtime)?;
        let now = Instant::now();
        let dict = &self.0;
        let mut inner = dict.lock();
        let exists = inner.map.get(&key).is_some_and(|e| !e.expired(now));
        match mode {
            Mode::Add | Mode::SafeAdd if exists => return fail("exists", false),
            Mode::Replace if !exists => return fail("not found", false),
            _ => {}
        }
        let Some(stored) = stored else {
            inner.remove(&key);
            return Ok(multi([Value::Boolean(true), Value::Nil, Value::Boolean(false)]));
        };
        let need = size_of(&key, &stored);
        let freed = inner.map.get(&key).map_or(0, |e| e.size);
        let safe = matches!(mode, Mode::SafeSet | Mode::SafeAdd);
        let (room, forcible) =
            inner.make_room(need.saturating_sub(freed), dict.capacity(), safe, &key, &dict.evictions);
        if !room {
            tracing::debug!(dict = dict.name, "no memory in shared dict");
            return fail("no memory", forcible);
        }
        inner.put(&key, stored, flags.unwrap_or(0), expires);
        Ok(multi([Value::Boolean(true), Value::Nil, Value::Boolean(forcible)]))
    }

    fn get(&self, lua: &Lua, key: Scalar, stale: bool) -> mlua::Result<Returns> {
        let key = match key_of(key) {
            Ok(k) => k,
            Err(message) => return Ok(multi([Value::Nil, text(lua, message)?])),
        };
        let now = Instant::now();
        let mut inner = self.0.lock();
        let Some(entry) = inner.map.get(&key) else { return Ok(multi([Value::Nil])) };
        let expired = entry.expired(now);
        if expired && !stale {
            return Ok(multi([Value::Nil]));
        }
        if matches!(entry.value, Stored::List(_)) {
            return Ok(multi([Value::Nil, text(lua, "value is a list")?]));
        }
        let value = to_lua(lua, &entry.value)?;
        let flags = if entry.flags == 0 { Value::Nil } else { Value::Integer(i64::from(entry.flags)) };
        if !expired {
            inner.touch(&key);
        }
        // Flags are returned only when set, as OpenResty does.
        match (stale, flags) {
            (true, flags) => Ok(multi([value, flags, Value::Boolean(expired)])),
            (false, Value::Nil) => Ok(multi([value])),
            (false, flags) => Ok(multi([value, flags])),
        }
    }

    fn incr(
        &self,
        lua: &Lua,
        (key, delta, init, init_ttl): (Scalar, Scalar, Option<f64>, Option<f64>),
    ) -> mlua::Result<Returns> {
        let key = match key_of(key) {
            Ok(k) => k,
            Err(message) => return Ok(multi([Value::Nil, text(lua, message)?])),
        };
        let delta = match delta {
            #[allow(clippy::cast_precision_loss)]
            Scalar::Int(i) => Some(i as f64),
            Scalar::Num(n) => Some(n),
            Scalar::Str(s) => std::str::from_utf8(&s).ok().and_then(|s| s.trim().parse::<f64>().ok()),
            _ => None,
        };
        let Some(delta) = delta else { return Ok(multi([Value::Nil, text(lua, "value not a number")?])) };
        let dict = &self.0;
        let mut inner = dict.lock();
        // A live number changes in place: same size, flags and expiry; only its recency moves.
        if let Some(value) = inner.bump(&key, delta) {
            return Ok(if init.is_some() {
                multi([Value::Number(value), Value::Nil, Value::Boolean(false)])
            } else {
                multi([Value::Number(value)])
            });
        }
        let current = inner.map.get(&key).filter(|e| e.live()).map(|e| (e.value.clone(), e.flags, e.expires));
        let (base, flags, expires) = match current {
            Some((Stored::Num(n), flags, expires)) => (n, flags, expires),
            Some(_) => return Ok(multi([Value::Nil, text(lua, "not a number")?])),
            None => match init {
                Some(init) => (init, 0, expiry(init_ttl).map_err(mlua::Error::runtime)?),
                None => return Ok(multi([Value::Nil, text(lua, "not found")?])),
            },
        };
        let value = base + delta;
        let stored = Stored::Num(value);
        let need = size_of(&key, &stored);
        let freed = inner.map.get(&key).map_or(0, |e| e.size);
        let (room, forcible) =
            inner.make_room(need.saturating_sub(freed), dict.capacity(), false, &key, &dict.evictions);
        if !room {
            return Ok(multi([Value::Nil, text(lua, "no memory")?]));
        }
        inner.put(&key, stored, flags, expires);
        // As lua-resty-core: `forcible` is only reported when `init` could have created the key.
        if init.is_some() {
            Ok(multi([Value::Number(value), Value::Nil, Value::Boolean(forcible)]))
        } else {
            Ok(multi([Value::Number(value)]))
        }
    }

    fn push(&self, lua: &Lua, key: Scalar, value: Scalar, front: bool) -> mlua::Result<Returns> {
        let key = match key_of(key) {
            Ok(k) => k,
            Err(message) => return Ok(multi([Value::Nil, text(lua, message)?])),
        };
        let item = match value {
            Scalar::Str(s) => Item::Str(s),
            #[allow(clippy::cast_precision_loss)]
            Scalar::Int(i) => Item::Num(i as f64),
            Scalar::Num(n) => Item::Num(n),
            _ => return Ok(multi([Value::Nil, text(lua, "bad value type")?])),
        };
        let now = Instant::now();
        let dict = &self.0;
        let mut inner = dict.lock();
        let item_size = ITEM_OVERHEAD + if let Item::Str(s) = &item { s.len() } else { 8 };
        let live = inner.map.get(&key).filter(|e| !e.expired(now));
        match live.map(|e| &e.value) {
            Some(Stored::List(_)) => {}
            Some(_) => return Ok(multi([Value::Nil, text(lua, "value not a list")?])),
            None => {
                let empty = Stored::List(VecDeque::new());
                let need = size_of(&key, &empty);
                let (room, _) = inner.make_room(need + item_size, dict.capacity(), false, &key, &dict.evictions);
                if !room {
                    return Ok(multi([Value::Nil, text(lua, "no memory")?]));
                }
                inner.put(&key, empty, 0, None);
            }
        }
        let (room, _) = inner.make_room(item_size, dict.capacity(), false, &key, &dict.evictions);
        if !room {
            return Ok(multi([Value::Nil, text(lua, "no memory")?]));
        }
        inner.touch(&key);
        inner.used += item_size;
        let Some(Entry { value: Stored::List(items), size, .. }) = inner.map.get_mut(&key) else {
            return Ok(multi([Value::Nil, text(lua, "value not a list")?]));
        };
        *size += item_size;
        if front {
            items.push_front(item);
        } else {
            items.push_back(item);
        }
        #[allow(clippy::cast_precision_loss)]
        Ok(multi([Value::Number(items.len() as f64)]))
    }

    fn pop(&self, lua: &Lua, key: Scalar, front: bool) -> mlua::Result<Returns> {
        let key = match key_of(key) {
            Ok(k) => k,
            Err(message) => return Ok(multi([Value::Nil, text(lua, message)?])),
        };
        let now = Instant::now();
        let mut inner = self.0.lock();
        let popped = match inner.map.get_mut(&key).filter(|e| !e.expired(now)) {
            None => return Ok(multi([Value::Nil])),
            Some(Entry { value: Stored::List(items), .. }) => {
                if front {
                    items.pop_front()
                } else {
                    items.pop_back()
                }
            }
            Some(_) => return Ok(multi([Value::Nil, text(lua, "value not a list")?])),
        };
        let emptied = inner.map.get(&key).is_some_and(|e| matches!(&e.value, Stored::List(items) if items.is_empty()));
        if emptied {
            inner.remove(&key);
        } else if let Some(entry) = inner.map.get(&key) {
            let size = size_of(&key, &entry.value);
            let old = entry.size;
            inner.used = inner.used + size - old;
            if let Some(entry) = inner.map.get_mut(&key) {
                entry.size = size;
            }
        }
        match popped {
            Some(item) => Ok(multi([item_to_lua(lua, &item)?])),
            None => Ok(multi([Value::Nil])),
        }
    }
}

/// Fills `methods` with `dict`'s methods for its object in Lua, whose address is `own`. Each
/// checks that it is called on that object (`dict:get(k)`, not `dict.get(k)`), as OpenResty's
/// do, then works on `dict` directly: a userdata's method took about 1,100 instructions to
/// find and borrow its receiver.
pub(crate) fn install_methods(lua: &Lua, methods: &Table, dict: &Arc<Dict>, own: usize) -> mlua::Result<()> {
    let methods = Methods { lua, table: methods, dict, own };
    {
        methods.add("get", |lua, this, key: Scalar| this.get(lua, key, false))?;
        methods.add("get_stale", |lua, this, key: Scalar| this.get(lua, key, true))?;
        methods.add("set", |lua, this, args: (Scalar, Scalar, Option<f64>, Option<u32>)| {
            this.store(lua, Mode::Set, args)
        })?;
        methods.add("safe_set", |lua, this, args: (Scalar, Scalar, Option<f64>, Option<u32>)| {
            this.store(lua, Mode::SafeSet, args)
        })?;
        methods.add("add", |lua, this, args: (Scalar, Scalar, Option<f64>, Option<u32>)| {
            this.store(lua, Mode::Add, args)
        })?;
        methods.add("safe_add", |lua, this, args: (Scalar, Scalar, Option<f64>, Option<u32>)| {
            this.store(lua, Mode::SafeAdd, args)
        })?;
        methods.add("replace", |lua, this, args: (Scalar, Scalar, Option<f64>, Option<u32>)| {
            this.store(lua, Mode::Replace, args)
        })?;
        methods.add("delete", |lua, this, key: Scalar| this.store(lua, Mode::Set, (key, Scalar::Nil, None, None)))?;
        methods.add("incr", |lua, this, args: (Scalar, Scalar, Option<f64>, Option<f64>)| this.incr(lua, args))?;
        methods.add("lpush", |lua, this, (key, value): (Scalar, Scalar)| this.push(lua, key, value, true))?;
        methods.add("rpush", |lua, this, (key, value): (Scalar, Scalar)| this.push(lua, key, value, false))?;
        methods.add("lpop", |lua, this, key: Scalar| this.pop(lua, key, true))?;
        methods.add("rpop", |lua, this, key: Scalar| this.pop(lua, key, false))?;
        methods.add("llen", |lua, this, key: Scalar| {
            let key = match key_of(key) {
                Ok(k) => k,
                Err(message) => return Ok(multi([Value::Nil, text(lua, message)?])),
            };
            let inner = this.0.lock();
            #[allow(clippy::cast_precision_loss)]
            match inner.map.get(&key).filter(|e| !e.expired(Instant::now())) {
                None => Ok(multi([Value::Number(0.0)])),
                Some(Entry { value: Stored::List(items), .. }) => Ok(multi([Value::Number(items.len() as f64)])),
                Some(_) => Ok(multi([Value::Nil, text(lua, "value not a list")?])),
            }
        })?;
        methods.add("flush_all", |_, this, ()| {
            let now = Instant::now();
            for entry in this.0.lock().map.values_mut() {
                entry.expires = Some(now);
            }
            Ok(())
        })?;
        methods.add("flush_expired", |_, this, max: Option<usize>| {
            let now = Instant::now();
            let mut inner = this.0.lock();
            let mut expired: Vec<Vec<u8>> =
                inner.map.iter().filter(|(_, e)| e.expired(now)).map(|(k, _)| k.clone()).collect();
            if let Some(max) = max.filter(|m| *m > 0) {
                expired.truncate(max);
            }
            for key in &expired {
                inner.remove(key);
            }
            Ok(expired.len())
        })?;
        methods.add("get_keys", |lua, this, max: Option<usize>| {
            let max = max.unwrap_or(1024);
            let now = Instant::now();
            let inner = this.0.lock();
            let keys = lua.create_table()?;
            // Oldest first, as nginx's queue order.
            for key in inner.lru.values().filter(|k| inner.map.get(*k).is_some_and(|e| !e.expired(now))) {
                if max > 0 && keys.raw_len() >= max {
                    break;
                }
                keys.raw_push(lua.create_string(key)?)?;
            }
            Ok(keys)
        })?;
        methods.add("ttl", |lua, this, key: Scalar| {
            let key = match key_of(key) {
                Ok(k) => k,
                Err(message) => return Ok(multi([Value::Nil, text(lua, message)?])),
            };
            let now = Instant::now();
            let inner = this.0.lock();
            match inner.map.get(&key).filter(|e| !e.expired(now)) {
                None => Ok(multi([Value::Nil, text(lua, "not found")?])),
                Some(e) => Ok(multi([Value::Number(e.expires.map_or(0.0, |t| t.duration_since(now).as_secs_f64()))])),
            }
        })?;
        methods.add("expire", |lua, this, (key, exptime): (Scalar, f64)| {
            let key = match key_of(key) {
                Ok(k) => k,
                Err(message) => return Ok(multi([Value::Nil, text(lua, message)?])),
            };
            let expires = expiry(Some(exptime)).map_err(mlua::Error::runtime)?;
            let now = Instant::now();
            let mut inner = this.0.lock();
            match inner.map.get_mut(&key).filter(|e| !e.expired(now)) {
                None => Ok(multi([Value::Nil, text(lua, "not found")?])),
                Some(e) => {
                    e.expires = expires;
                    Ok(multi([Value::Boolean(true)]))
                }
            }
        })?;
        methods.add("capacity", |_, this, ()| Ok(this.0.capacity()))?;
        methods.add("free_space", |_, this, ()| Ok(this.0.capacity().saturating_sub(this.0.used())))?;
    }
    Ok(())
}

/// Where [`install_methods`] puts them.
struct Methods<'a> {
    lua: &'a Lua,
    table: &'a Table,
    dict: &'a Arc<Dict>,
    own: usize,
}

impl Methods<'_> {
    fn add<A, R>(
        &self,
        name: &str,
        method: impl Fn(&Lua, &DictHandle, A) -> mlua::Result<R> + 'static,
    ) -> mlua::Result<()>
    where
        A: FromLuaMulti,
        R: IntoLuaMulti,
    {
        let this = DictHandle(Arc::clone(self.dict));
        let own = self.own;
        let function = self.lua.create_function(move |lua, (zone, args): (Address, A)| {
            if zone.0 != own {
                return Err(mlua::Error::runtime("bad \"zone\" argument"));
            }
            method(lua, &this, args)
        })?;
        self.table.raw_set(name, function)
    }
}
