//! Plugin manifests, parsed into one [`Manifest`] from either format as its ecosystem writes it:
//! - `plugin.json`, the nex assistant's format (snake_case keys, camelCase spellings accepted
//!   where the nex tooling writes them: `entryPoint`, `pluginType`, `configSchema`);
//! - `plugin-manifest.json`, the VCP plugin format (camelCase keys, `entryPoint {type, command}`,
//!   `communication {protocol, timeout}`, `capabilities.invocationCommands`).
//!
//! Parsing is pure (a JSON value in, a [`Manifest`] or an [`Error`] naming the field out); the
//! files are read by the loader in [`super`]. Unknown keys are ignored, as both ecosystems add
//! keys of their own.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use apex_protocol::{PluginInfo, PluginType};
use serde_json::{Map, Value, json};

/// File name of the nex assistant's manifest.
pub const PLUGIN_JSON: &str = "plugin.json";
/// File name of the VCP manifest.
pub const VCP_MANIFEST: &str = "plugin-manifest.json";
/// A VCP manifest renamed to this is a disabled plugin (VCP's own convention).
pub const VCP_MANIFEST_BLOCKED: &str = "plugin-manifest.json.block";

/// Time budget of one plugin run when the manifest gives none (60 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest timeout a manifest may ask for (24 h), in ms.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3_600_000;
/// Most runs `retry.max_attempts` may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
/// Longest `retry.backoff_ms` (10 min).
pub const MAX_BACKOFF_MS: u64 = 600_000;
/// Longest plugin name, in bytes: the tool-name bound of `apex_protocol::validate::Limits`.
pub const MAX_NAME_LEN: usize = 256;

/// Which manifest a plugin came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `plugin.json` (nex).
    PluginJson,
    /// `plugin-manifest.json` (VCP).
    Vcp,
}

impl Format {
    /// The manifest's file name, also `PluginInfo.format`.
    pub fn file_name(self) -> &'static str {
        match self {
            Format::PluginJson => PLUGIN_JSON,
            Format::Vcp => VCP_MANIFEST,
        }
    }
}

/// Why a manifest was refused: the field at fault (a dotted path, e.g. `entryPoint.command`)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {reason}")]
pub struct Error {
    /// The field, as spelt in the manifest (or `config.env` for that file).
    pub field: String,
    /// What is wrong with it, lowercase.
    pub reason: String,
}

pub(crate) fn error(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Re-runs of a plugin that reported failure (`status: "error"` or a non-zero exit; never
/// after a timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Runs in all, at least 1 (1: no retry).
    pub max_attempts: u32,
    /// Pause between two runs.
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff: Duration::ZERO,
        }
    }
}

/// A plugin's configuration values, passed to its process as environment variables. Never
/// logged (its `Debug` shows the keys only) and never sent to the hub.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, String>);

impl Secrets {
    /// The values, by variable name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Sets `key` (a later layer wins).
    pub fn insert(&mut self, key: String, value: String) {
        self.0.insert(key, value);
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// How many values there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Whether `key` can be an environment variable name: not empty, no `=` and no NUL.
pub fn valid_env_key(key: &str) -> bool {
    !key.is_empty() && !key.contains('=') && !key.contains('\0')
}

/// One plugin as its manifest describes it, whatever the format.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Tool name (`name`), checked like node tool names: not empty, at most
    /// [`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// What it does: `description`, else the VCP `displayName`, else `plugin <name>`.
    pub description: String,
    /// The entry command split into program and arguments, as a POSIX shell would split it
    /// (quotes and backslashes), without running a shell.
    pub command: Vec<String>,
    /// JSON Schema of the arguments (`parameters`, default `{"type": "object"}`).
    pub parameters: Value,
    /// Example calls (`examples` of `plugin.json`; from each VCP `invocationCommands` entry:
    /// `{"command", "description", "example"}`, absent parts left out).
    pub examples: Vec<Value>,
    /// Metadata declared to the hub in `ToolDescription.plugin`.
    pub info: PluginInfo,
    /// Budget of one run; the process group is killed past it.
    pub timeout: Duration,
    /// Re-runs after a reported failure.
    pub retry: Retry,
    /// Values of the manifest's `config` object (the loader adds `config.env`).
    pub config: Secrets,
}

/// Parses a manifest of `format` from its JSON text.
///
/// # Errors
/// [`Error`] naming the field at fault (`(file)` when the text is not a JSON object).
pub fn parse(format: Format, text: &str) -> Result<Manifest, Error> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| error("(file)", format!("is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(error("(file)", "must hold a JSON object"));
    };
    match format {
        Format::PluginJson => parse_plugin_json(&obj),
        Format::Vcp => parse_vcp(&obj),
    }
}

/// `plugin.json` (nex): `name`, `version`, `description`, `author`, `capabilities` (strings),
/// `config_schema`, `dependencies`, `entry_point`/`entryPoint`, `parameters`, `examples`,
/// `plugin_type`/`pluginType`, `timeout` (ms), `callback_auth`, `retry`, `config`.
fn parse_plugin_json(obj: &Map<String, Value>) -> Result<Manifest, Error> {
    let f = Fields(obj);
    let name = name(&f)?;
    let (entry_key, entry) = f
        .first_of(&["entry_point", "entryPoint"])
        .ok_or_else(|| error("entry_point", "is missing"))?;
    let command = entry_command(entry_key, entry)?;
    let plugin_type = plugin_type(&f, &["plugin_type", "pluginType"])?;
    let capabilities = f.strings("capabilities")?;
    let examples = match f.get("examples") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(error("examples", "must be a list")),
    };
    let info = PluginInfo {
        version: f.string("version")?,
        author: author(&f)?,
        capabilities,
        config_schema: config_schema(&f, &["config_schema", "configSchema"])?,
        dependencies: dependencies(&f)?,
        plugin_type,
        callback_auth: Some(callback_auth(&f)?),
        format: Some(PLUGIN_JSON.to_owned()),
    };
    let description = f.string("description")?.unwrap_or_default();
    Ok(Manifest {
        description: describe(&name, description, None),
        command,
        parameters: parameters(&f)?,
        examples,
        info,
        timeout: timeout(&f, None)?,
        retry: retry(&f)?,
        config: config_values(&f)?,
        name,
    })
}

/// `plugin-manifest.json` (VCP): `name`, `displayName`, `version`, `description`, `author`,
/// `pluginType`, `entryPoint {type, command}`, `communication {protocol, timeout}`,
/// `configSchema`, `capabilities.invocationCommands`, and the apex additions `parameters`,
/// `retry`, `callback_auth`/`callbackAuth`, `config`.
fn parse_vcp(obj: &Map<String, Value>) -> Result<Manifest, Error> {
    let f = Fields(obj);
    let name = name(&f)?;
    let entry = f
        .get("entryPoint")
        .ok_or_else(|| error("entryPoint", "is missing"))?;
    let command = entry_command("entryPoint", entry)?;
    let plugin_type = plugin_type(&f, &["pluginType"])?;
    let communication = match f.get("communication") {
        None => None,
        Some(Value::Object(c)) => Some(c),
        Some(_) => return Err(error("communication", "must be an object")),
    };
    if let Some(c) = communication {
        match c.get("protocol") {
            None => {}
            Some(Value::String(p)) if p.eq_ignore_ascii_case("stdio") => {}
            Some(Value::String(p)) => {
                return Err(error(
                    "communication.protocol",
                    format!("is `{p}`; only `stdio` plugins run on nodes"),
                ));
            }
            Some(_) => return Err(error("communication.protocol", "must be a string")),
        }
    }
    let (capabilities, examples) = invocation_commands(&f)?;
    let info = PluginInfo {
        version: f.string("version")?,
        author: author(&f)?,
        capabilities,
        config_schema: config_schema(&f, &["configSchema", "config_schema"])?,
        dependencies: dependencies(&f)?,
        plugin_type,
        callback_auth: Some(callback_auth(&f)?),
        format: Some(VCP_MANIFEST.to_owned()),
    };
    let description = f.string("description")?.unwrap_or_default();
    let display_name = f.string("displayName")?;
    Ok(Manifest {
        description: describe(&name, description, display_name),
        command,
        parameters: parameters(&f)?,
        examples,
        info,
        timeout: timeout(&f, communication)?,
        retry: retry(&f)?,
        config: config_values(&f)?,
        name,
    })
}

/// Typed access to a manifest's top-level keys, each error naming the key.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// The first of `keys` present (spelling variants), with the spelling found.
    fn first_of(&self, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
        keys.iter().find_map(|k| self.get(k).map(|v| (*k, v)))
    }

    fn string(&self, key: &str) -> Result<Option<String>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(error(key, "must be a string")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, Error> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(error(format!("{key}[{i}]"), "must be a string")),
                })
                .collect(),
            Some(_) => Err(error(key, "must be a list of strings")),
        }
    }
}

fn name(f: &Fields<'_>) -> Result<String, Error> {
    let name = f
        .string("name")?
        .ok_or_else(|| error("name", "is missing"))?;
    check_name(&name)?;
    Ok(name)
}

/// The tool-name rules of `apex_protocol::validate`: not empty, at most [`MAX_NAME_LEN`]
/// bytes.
///
/// # Errors
/// [`Error`] on `name`.
pub fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(error("name", "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(error(
            "name",
            format!("is longer than {MAX_NAME_LEN} bytes"),
        ));
    }
    Ok(())
}

fn describe(name: &str, description: String, display_name: Option<String>) -> String {
    let description = description.trim();
    if !description.is_empty() {
        return description.to_owned();
    }
    match display_name.as_deref().map(str::trim) {
        Some(d) if !d.is_empty() => d.to_owned(),
        _ => format!("plugin {name}"),
    }
}

/// An entry point: a command string, a list of strings (program and arguments as they are),
/// or an object `{type, command}` whose `command` is either of those (`type`, e.g. `python`
/// or `nodejs`, is informational).
fn entry_command(key: &str, entry: &Value) -> Result<Vec<String>, Error> {
    let (field, command) = match entry {
        Value::Object(o) => match o.get("command") {
            Some(c) => (format!("{key}.command"), c),
            None => return Err(error(format!("{key}.command"), "is missing")),
        },
        other => (key.to_owned(), other),
    };
    let argv = match command {
        Value::String(s) => shlex::split(s)
            .ok_or_else(|| error(&field, "has an unclosed quote or a trailing \\"))?,
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(error(format!("{field}[{i}]"), "must be a string")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            return Err(error(
                &field,
                "must be a command string or a list of strings",
            ));
        }
    };
    match argv.first() {
        None => Err(error(&field, "is empty")),
        Some(p) if p.is_empty() => Err(error(&field, "names an empty program")),
        Some(p) if p.contains('\0') => Err(error(&field, "contains a NUL byte")),
        Some(_) => Ok(argv),
    }
}

fn plugin_type(f: &Fields<'_>, keys: &[&'static str]) -> Result<PluginType, Error> {
    let Some((key, v)) = f.first_of(keys) else {
        return Ok(PluginType::Synchronous);
    };
    let Value::String(s) = v else {
        return Err(error(key, "must be a string"));
    };
    match s.to_ascii_lowercase().as_str() {
        "synchronous" | "sync" => Ok(PluginType::Synchronous),
        "asynchronous" | "async" => Ok(PluginType::Asynchronous),
        _ => Err(error(
            key,
            format!("is `{s}`; nodes run `synchronous` and `asynchronous` plugins"),
        )),
    }
}

/// A string, or an object with a string `name` (package.json style).
fn author(f: &Fields<'_>) -> Result<Option<String>, Error> {
    match f.get("author") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("name") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(error("author.name", "must be a string")),
        },
        Some(_) => Err(error("author", "must be a string")),
    }
}

fn config_schema(f: &Fields<'_>, keys: &[&'static str]) -> Result<Option<Value>, Error> {
    match f.first_of(keys) {
        None => Ok(None),
        Some((_, v @ Value::Object(_))) => Ok(Some(v.clone())),
        Some((key, _)) => Err(error(key, "must be an object")),
    }
}

/// A list of strings, or an object of name → version string, declared as `name@version`.
fn dependencies(f: &Fields<'_>) -> Result<Vec<String>, Error> {
    match f.get("dependencies") {
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| match v {
                Value::String(ver) if ver.is_empty() => Ok(k.clone()),
                Value::String(ver) => Ok(format!("{k}@{ver}")),
                _ => Err(error(
                    format!("dependencies.{k}"),
                    "must be a version string",
                )),
            })
            .collect(),
        _ => f.strings("dependencies"),
    }
}

fn callback_auth(f: &Fields<'_>) -> Result<String, Error> {
    let Some((key, v)) = f.first_of(&["callback_auth", "callbackAuth"]) else {
        return Ok("signature".to_owned());
    };
    match v {
        Value::String(s) if s == "signature" || s == "token" => Ok(s.clone()),
        Value::String(s) => Err(error(
            key,
            format!("is `{s}`; must be `signature` or `token`"),
        )),
        _ => Err(error(key, "must be a string")),
    }
}

fn parameters(f: &Fields<'_>) -> Result<Value, Error> {
    match f.get("parameters") {
        None => Ok(json!({"type": "object"})),
        Some(v @ Value::Object(_)) => Ok(v.clone()),
        Some(_) => Err(error("parameters", "must be a JSON Schema object")),
    }
}

/// `communication.timeout` (VCP) wins over a top-level `timeout`; both in milliseconds.
fn timeout(f: &Fields<'_>, communication: Option<&Map<String, Value>>) -> Result<Duration, Error> {
    let (field, v) = match communication.and_then(|c| c.get("timeout").filter(|v| !v.is_null())) {
        Some(v) => ("communication.timeout", v),
        None => match f.get("timeout") {
            Some(v) => ("timeout", v),
            None => return Ok(DEFAULT_TIMEOUT),
        },
    };
    match v.as_u64() {
        Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err(error(
            field,
            format!("must be a whole number of milliseconds between 1 and {MAX_TIMEOUT_MS}"),
        )),
    }
}

/// `retry {max_attempts, backoff_ms}` (`maxAttempts`, `backoffMs` accepted).
fn retry(f: &Fields<'_>) -> Result<Retry, Error> {
    let obj = match f.get("retry") {
        None => return Ok(Retry::default()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(error("retry", "must be an object")),
    };
    let pick = |names: [&'static str; 2]| {
        names
            .iter()
            .find_map(|n| obj.get(*n).filter(|v| !v.is_null()).map(|v| (*n, v)))
    };
    let max_attempts = match pick(["max_attempts", "maxAttempts"]) {
        None => 1,
        Some((k, v)) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if (1..=MAX_ATTEMPTS).contains(&n) => n,
            _ => {
                return Err(error(
                    format!("retry.{k}"),
                    format!("must be a whole number between 1 and {MAX_ATTEMPTS}"),
                ));
            }
        },
    };
    let backoff_ms = match pick(["backoff_ms", "backoffMs"]) {
        None => 0,
        Some((k, v)) => match v.as_u64() {
            Some(n) if n <= MAX_BACKOFF_MS => n,
            _ => {
                return Err(error(
                    format!("retry.{k}"),
                    format!("must be a whole number of milliseconds up to {MAX_BACKOFF_MS}"),
                ));
            }
        },
    };
    Ok(Retry {
        max_attempts,
        backoff: Duration::from_millis(backoff_ms),
    })
}

/// `config`: an object of variable name → string, number or boolean (written as text).
fn config_values(f: &Fields<'_>) -> Result<Secrets, Error> {
    let mut out = Secrets::default();
    let obj = match f.get("config") {
        None => return Ok(out),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(error("config", "must be an object")),
    };
    for (k, v) in obj {
        if !valid_env_key(k) {
            return Err(error(
                format!("config.{k}"),
                "is not a valid environment variable name",
            ));
        }
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(error(
                    format!("config.{k}"),
                    "must be a string, a number or a boolean",
                ));
            }
        };
        if text.contains('\0') {
            return Err(error(format!("config.{k}"), "contains a NUL byte"));
        }
        out.insert(k.clone(), text);
    }
    Ok(out)
}

/// `capabilities.invocationCommands[{commandIdentifier, description, example}]` → the
/// capability names and the tool's examples.
fn invocation_commands(f: &Fields<'_>) -> Result<(Vec<String>, Vec<Value>), Error> {
    let caps = match f.get("capabilities") {
        None => return Ok((Vec::new(), Vec::new())),
        Some(Value::Object(o)) => o,
        // A plugin.json-style list of names is accepted too.
        Some(Value::Array(_)) => return Ok((f.strings("capabilities")?, Vec::new())),
        Some(_) => return Err(error("capabilities", "must be an object")),
    };
    let commands = match caps.get("invocationCommands").filter(|v| !v.is_null()) {
        None => return Ok((Vec::new(), Vec::new())),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(error("capabilities.invocationCommands", "must be a list"));
        }
    };
    let mut names = Vec::new();
    let mut examples = Vec::new();
    for (i, c) in commands.iter().enumerate() {
        let at = |k: &str| format!("capabilities.invocationCommands[{i}].{k}");
        let Value::Object(c) = c else {
            return Err(error(
                format!("capabilities.invocationCommands[{i}]"),
                "must be an object",
            ));
        };
        let mut example = Map::new();
        for (key, out) in [
            ("commandIdentifier", "command"),
            ("description", "description"),
            ("example", "example"),
        ] {
            match c.get(key).filter(|v| !v.is_null()) {
                None => {}
                Some(Value::String(s)) => {
                    example.insert(out.to_owned(), Value::String(s.clone()));
                }
                Some(_) => return Err(error(at(key), "must be a string")),
            }
        }
        if let Some(Value::String(id)) = example.get("command") {
            names.push(id.clone());
        }
        if !example.is_empty() {
            examples.push(Value::Object(example));
        }
    }
    Ok((names, examples))
}

/// Parses a `config.env` file: `KEY=VALUE` lines; blank lines and `#` comments skipped; an
/// `export ` prefix allowed; a value in matching single or double quotes is unquoted (no
/// escapes); spaces around the key and the value trimmed.
///
/// # Errors
/// [`Error`] on `config.env:<line>` for a line without `=` or with a bad key.
pub fn parse_env_file(text: &str) -> Result<Secrets, Error> {
    let mut out = Secrets::default();
    for (i, line) in text.lines().enumerate() {
        let field = || format!("config.env:{}", i + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(error(field(), "is not a KEY=VALUE line"));
        };
        let k = k.trim();
        if !valid_env_key(k) || k.contains(char::is_whitespace) {
            return Err(error(field(), "has an invalid variable name"));
        }
        let v = v.trim();
        let v = ['"', '\'']
            .iter()
            .find_map(|q| {
                v.strip_prefix(*q)
                    .and_then(|rest| rest.strip_suffix(*q))
                    .filter(|_| v.len() >= 2)
            })
            .unwrap_or(v);
        if v.contains('\0') {
            return Err(error(field(), "contains a NUL byte"));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_nex_plugin_json_is_parsed() {
        let m = parse(
            Format::PluginJson,
            r#"{
                "name": "word_count",
                "version": "1.2.0",
                "description": "Counts words",
                "author": {"name": "Ada"},
                "capabilities": ["text", "count"],
                "config_schema": {"type": "object", "properties": {"LANG_HINT": {"type": "string"}}},
                "dependencies": {"python": ">=3.9"},
                "entry_point": {"type": "python", "command": "python3 'main file.py' --fast"},
                "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
                "timeout": 1500,
                "retry": {"max_attempts": 3, "backoff_ms": 20},
                "config": {"MODE": "strict", "LIMIT": 5, "DEBUG": false},
                "something_else": true
            }"#,
        )
        .unwrap();
        assert_eq!(m.name, "word_count");
        assert_eq!(m.description, "Counts words");
        assert_eq!(m.command, vec!["python3", "main file.py", "--fast"]);
        assert_eq!(m.parameters["required"], json!(["text"]));
        assert_eq!(m.timeout, Duration::from_millis(1500));
        assert_eq!(
            m.retry,
            Retry {
                max_attempts: 3,
                backoff: Duration::from_millis(20)
            }
        );
        assert_eq!(m.config.get("LIMIT"), Some("5"));
        assert_eq!(m.config.get("DEBUG"), Some("false"));
        assert_eq!(
            m.info,
            PluginInfo {
                version: Some("1.2.0".into()),
                author: Some("Ada".into()),
                capabilities: vec!["text".into(), "count".into()],
                config_schema: Some(
                    json!({"type": "object", "properties": {"LANG_HINT": {"type": "string"}}})
                ),
                dependencies: vec!["python@>=3.9".into()],
                plugin_type: PluginType::Synchronous,
                callback_auth: Some("signature".into()),
                format: Some("plugin.json".into()),
            }
        );
        // The secrets' Debug shows keys only.
        let shown = format!("{m:?}");
        assert!(
            shown.contains("MODE") && !shown.contains("strict"),
            "{shown}"
        );
    }

    #[test]
    fn plugin_json_defaults_and_spellings() {
        let m = parse(
            Format::PluginJson,
            r#"{"name": "p", "entryPoint": ["./run", "a b"], "pluginType": "asynchronous",
                "callback_auth": "token"}"#,
        )
        .unwrap();
        assert_eq!(m.command, vec!["./run", "a b"]);
        assert_eq!(m.parameters, json!({"type": "object"}));
        assert_eq!(m.description, "plugin p");
        assert_eq!(m.timeout, DEFAULT_TIMEOUT);
        assert_eq!(m.retry, Retry::default());
        assert_eq!(m.info.plugin_type, PluginType::Asynchronous);
        assert_eq!(m.info.callback_auth.as_deref(), Some("token"));
        let m = parse(
            Format::PluginJson,
            r#"{"name": "p", "entry_point": "sh run.sh"}"#,
        )
        .unwrap();
        assert_eq!(m.command, vec!["sh", "run.sh"]);
    }

    #[test]
    fn a_vcp_manifest_is_parsed() {
        let m = parse(
            Format::Vcp,
            r#"{
                "manifestVersion": "1.0.0",
                "name": "Shout",
                "displayName": "Shouter",
                "version": "0.3.0",
                "description": "",
                "author": "vcp",
                "pluginType": "synchronous",
                "entryPoint": {"type": "sh", "command": "sh shout.sh"},
                "communication": {"protocol": "stdio", "timeout": 5000},
                "configSchema": {"SHOUT_SUFFIX": "string"},
                "capabilities": {"invocationCommands": [
                    {"commandIdentifier": "shout", "description": "Upper-cases text",
                     "example": "{\"text\": \"hi\"}"},
                    {"commandIdentifier": "whisper"}
                ]},
                "retry": {"maxAttempts": 2, "backoffMs": 0}
            }"#,
        )
        .unwrap();
        assert_eq!(m.name, "Shout");
        assert_eq!(m.description, "Shouter", "displayName stands in");
        assert_eq!(m.command, vec!["sh", "shout.sh"]);
        assert_eq!(m.timeout, Duration::from_millis(5000));
        assert_eq!(m.retry.max_attempts, 2);
        assert_eq!(m.info.capabilities, vec!["shout", "whisper"]);
        assert_eq!(
            m.examples,
            vec![
                json!({"command": "shout", "description": "Upper-cases text", "example": "{\"text\": \"hi\"}"}),
                json!({"command": "whisper"}),
            ]
        );
        assert_eq!(
            m.info.config_schema,
            Some(json!({"SHOUT_SUFFIX": "string"}))
        );
        assert_eq!(m.info.format.as_deref(), Some("plugin-manifest.json"));
        assert_eq!(m.info.version.as_deref(), Some("0.3.0"));
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let cases: &[(Format, &str, &str)] = &[
            (Format::PluginJson, "not json", "(file)"),
            (Format::PluginJson, "[1]", "(file)"),
            (Format::PluginJson, r#"{"entry_point": "x"}"#, "name"),
            (
                Format::PluginJson,
                r#"{"name": 3, "entry_point": "x"}"#,
                "name",
            ),
            (
                Format::PluginJson,
                r#"{"name": "", "entry_point": "x"}"#,
                "name",
            ),
            (Format::PluginJson, r#"{"name": "p"}"#, "entry_point"),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": ""}"#,
                "entry_point",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "sh 'x"}"#,
                "entry_point",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": {"type": "python"}}"#,
                "entry_point.command",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "timeout": "5s"}"#,
                "timeout",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "timeout": 0}"#,
                "timeout",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "capabilities": "all"}"#,
                "capabilities",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "capabilities": [1]}"#,
                "capabilities[0]",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "parameters": "any"}"#,
                "parameters",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "retry": {"max_attempts": 0}}"#,
                "retry.max_attempts",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "callback_auth": "none"}"#,
                "callback_auth",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "plugin_type": "static"}"#,
                "plugin_type",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "config": {"A=B": "1"}}"#,
                "config.A=B",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "config": {"A": [1]}}"#,
                "config.A",
            ),
            (
                Format::PluginJson,
                r#"{"name": "p", "entry_point": "x", "version": 2}"#,
                "version",
            ),
            (Format::Vcp, r#"{"name": "p"}"#, "entryPoint"),
            (
                Format::Vcp,
                r#"{"name": "p", "entryPoint": {"command": "x"}, "communication": {"protocol": "direct"}}"#,
                "communication.protocol",
            ),
            (
                Format::Vcp,
                r#"{"name": "p", "entryPoint": {"command": "x"}, "communication": {"timeout": -1}}"#,
                "communication.timeout",
            ),
            (
                Format::Vcp,
                r#"{"name": "p", "entryPoint": {"command": "x"}, "pluginType": "service"}"#,
                "pluginType",
            ),
            (
                Format::Vcp,
                r#"{"name": "p", "entryPoint": {"command": "x"}, "capabilities": {"invocationCommands": [{"commandIdentifier": 1}]}}"#,
                "capabilities.invocationCommands[0].commandIdentifier",
            ),
        ];
        let long = format!(
            r#"{{"name": "{}", "entry_point": "x"}}"#,
            "n".repeat(MAX_NAME_LEN + 1)
        );
        assert_eq!(parse(Format::PluginJson, &long).unwrap_err().field, "name");
        for (format, text, field) in cases {
            let e = parse(*format, text).unwrap_err();
            assert_eq!(&e.field, field, "{text}: {e}");
            assert!(!e.reason.is_empty());
        }
    }

    #[test]
    fn config_env_files_are_parsed() {
        let s = parse_env_file(
            "# comment\n\nAPI_KEY = abc=def\nexport REGION=\"eu west\"\nQUOTE='x'\nEMPTY=\n",
        )
        .unwrap();
        assert_eq!(s.get("API_KEY"), Some("abc=def"));
        assert_eq!(s.get("REGION"), Some("eu west"));
        assert_eq!(s.get("QUOTE"), Some("x"));
        assert_eq!(s.get("EMPTY"), Some(""));
        assert_eq!(s.len(), 4);
        let e = parse_env_file("A=1\njust words\n").unwrap_err();
        assert_eq!(e.field, "config.env:2");
        let e = parse_env_file("BAD KEY=1\n").unwrap_err();
        assert_eq!(e.field, "config.env:1");
    }
}
