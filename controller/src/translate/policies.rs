//! What an object's route settings ask of each request, as the snapshot's typed [`Policies`]:
//! the Ingress annotations (and a LuaRoute's policy fields, read as the same annotations) with
//! the Secrets they name. Anything that cannot be honoured refuses the routes (503): never
//! served with less protection than asked.

use tidegate_snapshot::{BasicAuth, ClientCertificate, Credential, Mirror, Policies, Redirect, Refusal, SetHeader};

use super::annotations::Settings;
use super::configmap::{self, Global};
use super::index::Index;
use crate::status::{ObjectStatus, Reason};

/// The typed policies `settings` ask for, reading the Secrets and ConfigMaps they name, with
/// what the global ConfigMap sets for every route: its global auth applies when they name no
/// external auth of their own and do not turn it off. The refusal is set when something that
/// protects the routes cannot be honoured; its cause is in `status` (or the ConfigMap's).
pub(super) fn resolve(
    settings: &Settings,
    namespace: &str,
    index: &Index<'_>,
    global: &Global,
    status: &mut ObjectStatus,
) -> (Policies, Option<Refusal>) {
    let mut refusal = global.refusal.clone();
    let own_auth = settings.external_auth.typed();
    let uses_global_auth = own_auth.is_none() && settings.global_auth;
    if uses_global_auth && refusal.is_none() {
        refusal.clone_from(&global.auth_refusal);
    }
    let external_auth = match own_auth {
        Some(mut auth) => match auth_headers(settings, namespace, index, status) {
            Ok(headers) => {
                auth.set_headers = headers;
                Some(auth)
            }
            Err(()) => {
                refusal.get_or_insert_with(|| format!("{} asks for auth headers that cannot be read", status.object));
                None
            }
        },
        None if uses_global_auth => global.auth.clone(),
        None => None,
    };
    let basic_auth = basic_auth(settings, namespace, index, status).unwrap_or_else(|()| {
        refusal = Some(format!("{} asks for Basic authentication that cannot be read", status.object));
        None
    });
    let client_certificate = client_certificate(settings, namespace, index, status).unwrap_or_else(|()| {
        refusal.get_or_insert_with(|| format!("{} asks for client certificates that cannot be checked", status.object));
        None
    });
    if refusal.is_none() && !settings.unhonoured.is_empty() {
        let keys = settings.unhonoured.join(", ");
        refusal = Some(format!("{} asks for {keys}, which tidegate does not honour", status.object));
    }
    let mut ip = settings.ip.clone();
    ip.deny.extend(global.block_cidrs.iter().copied());
    ip.ordered.extend(settings.snippet_ip_rules.iter().copied());
    let mut response_headers = global.response_headers.clone();
    response_headers.extend(custom_headers(settings, namespace, index, global, status));
    response_headers.extend(settings.snippet_response_headers.iter().cloned());
    let mut upstream_headers = global.upstream_headers.clone();
    upstream_headers.extend(settings.snippet_upstream_headers.iter().cloned());
    // `connection-proxy-header`, as nginx's `proxy_set_header Connection` (an HTTP/2 upstream
    // drops it, as connection headers have no place there).
    if let Some(value) = settings.connection_header.as_deref().and_then(|v| v.parse().ok()) {
        upstream_headers.push(tidegate_snapshot::SetHeader { name: "connection".into(), value });
    }
    let blocked = &global.blocked;
    let id = format!("{}/{}", status.object.namespace.as_deref().unwrap_or_default(), status.object.name);
    let shared_limit = settings.limits.shared.typed(id).unwrap_or_else(|why| {
        status.error(Reason::Invalid, settings.field("global-rate-limit"), format!("{why}; the routes answer 503"));
        refusal.get_or_insert_with(|| format!("{} asks for a global rate limit without its {why}", status.object));
        None
    });
    let policies = Policies {
        ip: (!ip.is_empty()).then_some(ip),
        blocked: (!blocked.user_agents.is_empty() || !blocked.referers.is_empty()).then(|| blocked.clone()),
        response_headers,
        upstream_headers,
        max_body_bytes: settings.max_body_bytes,
        limits: settings.limits.typed(),
        shared_limit,
        response_rate: settings.limits.response_rate(),
        cors: settings.cors.enabled.then(|| settings.cors.cors.clone()),
        basic_auth,
        // An object's own auth-url takes the place of the global one.
        external_auth,
        satisfy_any: settings.satisfy_any,
        client_certificate,
        upstream_host: settings.upstream_host.clone(),
        forwarded_prefix: settings.forwarded_prefix.clone(),
        // A temporal redirect wins over a permanent one, as in ingress-nginx.
        // A snippet's `return 3xx` runs where the location's configuration does, before the
        // annotations' redirects would.
        redirect: match (&settings.temporal_redirect, &settings.permanent_redirect) {
            _ if settings.snippet_redirect.is_some() => settings.snippet_redirect.clone(),
            (Some(to), _) => Some(Redirect { to: to.clone(), status: settings.temporal_code }),
            (None, Some(to)) => Some(Redirect { to: to.clone(), status: settings.permanent_code }),
            (None, None) => None,
        },
        app_root: settings.app_root.clone(),
        mirror: settings.mirror_target.clone().map(|target| Mirror {
            target,
            host: settings.mirror_host.clone(),
            request_body: settings.mirror_body,
        }),
        rewrite_target: settings.rewrite_target.clone(),
        location_rewrite: settings.redirect_from.clone().zip(settings.redirect_to.clone()),
        // Per path (the Service it names): set by the Ingress's translation.
        error_pages: None,
        no_access_log: !settings.access_log,
        relative_redirects: settings.relative_redirects,
    };
    (policies, refusal.map(Refusal::unhonoured))
}

/// The headers of the ConfigMap `auth-proxy-set-headers` names, in the object's namespace.
/// `Err` (recorded naming the key) when it is missing or does not read: the auth service would
/// be asked without them.
fn auth_headers(
    settings: &Settings,
    namespace: &str,
    index: &Index<'_>,
    status: &mut ObjectStatus,
) -> Result<Vec<SetHeader>, ()> {
    let Some(name) = &settings.external_auth.proxy_set_headers else { return Ok(Vec::new()) };
    let field = settings.field("auth-proxy-set-headers");
    let (own, name) = name.split_once('/').unwrap_or((namespace, name));
    if own != namespace {
        let why = format!("ConfigMap {own}/{name} is in another namespace, which tidegate does not read");
        status.error(Reason::Invalid, field, format!("{why}; the routes answer 503"));
        return Err(());
    }
    configmap::headers(index, namespace, name).map_err(|(reason, message)| {
        status.error(reason, field, format!("{message}; the routes answer 503"));
    })
}

/// The headers of the ConfigMap `custom-headers` names, in the object's namespace, less those
/// the global ConfigMap's `global-allowed-response-headers` does not list (each reported), as
/// ingress-nginx allows them.
fn custom_headers(
    settings: &Settings,
    namespace: &str,
    index: &Index<'_>,
    global: &Global,
    status: &mut ObjectStatus,
) -> Vec<SetHeader> {
    let Some(name) = &settings.custom_headers else { return Vec::new() };
    let field = settings.field("custom-headers");
    let (own, name) = name.split_once('/').unwrap_or((namespace, name));
    if own != namespace {
        let why = format!("ConfigMap {own}/{name} is in another namespace, which tidegate does not read; ignored");
        status.warning(Reason::Invalid, field, why);
        return Vec::new();
    }
    let headers = match configmap::headers(index, namespace, name) {
        Ok(headers) => headers,
        Err((reason, message)) => {
            status.warning(reason, field, format!("{message}; ignored"));
            return Vec::new();
        }
    };
    let (allowed, refused): (Vec<_>, Vec<_>) =
        headers.into_iter().partition(|h| global.allowed_response_headers.contains(&h.name));
    if !refused.is_empty() {
        let names: Vec<&str> = refused.iter().map(|h| h.name.as_str()).collect();
        status.warning(
            Reason::Invalid,
            field,
            format!(
                "{} not allowed by the global ConfigMap's global-allowed-response-headers; not set",
                names.join(", ")
            ),
        );
    }
    allowed
}

/// The users of `auth-type: basic`, read from the Secret `auth-secret` names (an htpasswd file
/// under key `auth`, or with `auth-secret-type: auth-map` one key per user). `Err` when the
/// Ingress must not be served: the Secret is missing, in another namespace, or holds a line that
/// does not read; each is recorded naming the key.
fn basic_auth(
    settings: &Settings,
    namespace: &str,
    index: &Index<'_>,
    status: &mut ObjectStatus,
) -> Result<Option<BasicAuth>, ()> {
    let keys = &settings.basic_auth;
    let field = |key: &str| settings.field(key);
    let refuse = |status: &mut ObjectStatus, reason: Reason, key: &str, why: String| {
        status.error(reason, field(key), format!("{why}; the routes answer 503"));
        Err(())
    };
    let Some(secret) = &keys.secret else {
        if keys.enabled {
            return refuse(status, Reason::Invalid, "auth-type", "auth-type basic needs auth-secret".into());
        }
        return Ok(None);
    };
    if !keys.enabled {
        let why = "auth-secret is set without auth-type: basic, and would otherwise be served open";
        return refuse(status, Reason::Invalid, "auth-secret", why.into());
    }
    let (secret_namespace, name) = secret.split_once('/').unwrap_or((namespace, secret));
    if secret_namespace != namespace {
        let why = format!("Secret {secret} is in another namespace, which tidegate does not read");
        return refuse(status, Reason::Invalid, "auth-secret", why);
    }
    let entries = match index.secret_text(namespace, name) {
        Ok(entries) => entries,
        Err((reason, message)) => return refuse(status, reason, "auth-secret", message),
    };
    let mut lines: Vec<(String, String, String)> = Vec::new();
    if keys.map {
        lines.extend(entries.iter().map(|(user, hash)| (format!("key {user:?}"), user.clone(), hash.clone())));
    } else {
        let Some(file) = entries.get("auth") else {
            let why = format!("Secret {namespace}/{name} has no key \"auth\" (an htpasswd file)");
            return refuse(status, Reason::Invalid, "auth-secret", why);
        };
        for (n, line) in file.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').unwrap_or((line, ""));
            lines.push((format!("line {}", n + 1), user.to_owned(), hash.to_owned()));
        }
    }
    let mut users: Vec<Credential> = Vec::new();
    for (at, user, hash) in lines {
        match hash.parse() {
            Ok(hash) if !user.is_empty() => users.push(Credential { user, hash }),
            Ok(_) => {
                let why = format!("Secret {namespace}/{name} {at}: no user name");
                return refuse(status, Reason::Invalid, "auth-secret", why);
            }
            Err(why) => {
                let why = format!("Secret {namespace}/{name} {at}: {why}");
                return refuse(status, Reason::Invalid, "auth-secret", why);
            }
        }
    }
    if users.is_empty() {
        return refuse(status, Reason::Invalid, "auth-secret", format!("Secret {namespace}/{name} lists no user"));
    }
    // nginx takes a user's first line; so does this (the sort is stable).
    users.sort_by(|a, b| a.user.cmp(&b.user));
    users.dedup_by(|later, first| later.user == first.user);
    Ok(Some(BasicAuth { realm: keys.realm.clone(), users }))
}

/// Client certificates (`auth-tls-secret` and the `auth-tls-*` keys): the CA bundle under
/// `ca.crt` of the Secret, in the Ingress's namespace. `Err` when the Ingress must not be served:
/// the Secret is missing or holds no certificate, or verification is asked without a Secret.
fn client_certificate(
    settings: &Settings,
    namespace: &str,
    index: &Index<'_>,
    status: &mut ObjectStatus,
) -> Result<Option<ClientCertificate>, ()> {
    let keys = &settings.client_cert;
    let refuse = |status: &mut ObjectStatus, reason: Reason, key: &str, why: String| {
        status.error(reason, settings.field(key), format!("{why}; the routes answer 503"));
        Err(())
    };
    let Some(verify) = keys.verify else { return Ok(None) };
    let Some(secret) = &keys.secret else {
        if settings.written.contains_key("auth-tls-verify-client") {
            let why = "auth-tls-verify-client needs auth-tls-secret".to_owned();
            return refuse(status, Reason::Invalid, "auth-tls-verify-client", why);
        }
        return Ok(None);
    };
    let (secret_namespace, name) = secret.split_once('/').unwrap_or((namespace, secret));
    if secret_namespace != namespace {
        let why = format!("Secret {secret} is in another namespace, which tidegate does not read");
        return refuse(status, Reason::Invalid, "auth-tls-secret", why);
    }
    let entries = match index.secret_text(namespace, name) {
        Ok(entries) => entries,
        Err((reason, message)) => return refuse(status, reason, "auth-tls-secret", message),
    };
    let Some(ca_pem) = entries.get("ca.crt").filter(|pem| pem.contains("-----BEGIN CERTIFICATE-----")) else {
        let why = format!("Secret {namespace}/{name} has no PEM certificate under ca.crt");
        return refuse(status, Reason::Invalid, "auth-tls-secret", why);
    };
    Ok(Some(ClientCertificate {
        ca_id: format!("{namespace}/{name}"),
        ca_pem: ca_pem.clone(),
        verify,
        depth: keys.depth,
        error_page: keys.error_page.clone(),
        pass_to_upstream: keys.pass_to_upstream,
        match_subject: keys.match_subject.clone(),
    }))
}
