//! Plugins: tools the node loads at start from `--plugin-dir DIR` (config `plugin_dirs`), one
//! per subdirectory of DIR holding a manifest, run as child processes over stdio in any
//! language.
//!
//! - [`manifest`]: the two manifest formats (`plugin.json`, `plugin-manifest.json`) parsed
//!   into one `Manifest`;
//! - [`process`]: one run of a plugin process in its own process group, killed and reaped at
//!   its end, timeout or cancellation;
//! - [`tool`]: `PluginTool`, the `Tool` that runs a plugin, its stdio contract, retries and
//!   asynchronous plugins.
//!
//! Loading never stops the node: a subdirectory with a bad manifest (unreadable, not JSON, a
//! missing or ill-typed field, a bad or taken name, a protocol other than stdio, a program
//! that cannot be found) is skipped with one warning naming the file and the field; one with
//! `plugin-manifest.json.block` is a disabled plugin, skipped with one info line; one with no
//! manifest is not a plugin. Subdirectories are read in name order; of two plugins with one
//! name the first is kept.

use std::fmt;
use std::path::{Path, PathBuf};

pub mod manifest;
pub mod process;
pub mod tool;

pub use manifest::{Format, Manifest};
pub use tool::PluginTool;

/// The names of every built-in tool, taken or not on this node: a plugin may not use one
/// (the node's configuration decides which built-ins it offers, and a plugin must not take a
/// built-in's name when that changes).
pub const BUILTIN_NAMES: &[&str] = &[
    "echo",
    "noop",
    "sleep",
    "http_fetch",
    "sha256",
    "file_read",
    "file_list",
    "system_info",
    "shell",
    "llm.summarize",
    "llm.chat",
    "agent.run",
];

/// Largest manifest read, in bytes (1 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// The per-plugin file of configuration values (`KEY=VALUE` lines), as VCP plugins keep theirs.
pub const CONFIG_ENV: &str = "config.env";

/// A plugin directory that was not loaded, and why: what the warning says.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The manifest (or `config.env`) at fault.
    pub file: PathBuf,
    /// The field and the problem.
    pub error: manifest::Error,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.error)
    }
}

/// What [`load`] found.
#[derive(Default)]
pub struct Loaded {
    /// The plugins, in load order.
    pub tools: Vec<PluginTool>,
    /// Plugin directories with a bad manifest.
    pub skipped: Vec<Skipped>,
    /// Plugin directories disabled with `plugin-manifest.json.block`.
    pub disabled: Vec<PathBuf>,
}

/// Loads the plugins of every subdirectory of each of `dirs`, refusing names in `taken` (the
/// node's other tools; [`BUILTIN_NAMES`] are always refused). Logs one line per plugin
/// loaded (info), disabled (info) or skipped (warn). Configuration values are never logged.
pub fn load(dirs: &[PathBuf], taken: &[String]) -> Loaded {
    let mut loaded = Loaded::default();
    let mut names: Vec<String> = taken.to_vec();
    names.extend(BUILTIN_NAMES.iter().map(|s| (*s).to_owned()));
    for dir in dirs {
        let mut subdirs = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                // Following symlinks: a plugin may be linked in.
                .filter(|p| p.is_dir())
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the plugin directory; no plugins loaded from it");
                continue;
            }
        };
        subdirs.sort();
        for sub in subdirs {
            match load_one(&sub, &names) {
                Ok(None) => {}
                Ok(Some(Found::Disabled(file))) => {
                    tracing::info!(file = %file.display(), "plugin disabled (plugin-manifest.json.block): skipped");
                    loaded.disabled.push(sub);
                }
                Ok(Some(Found::Plugin(t))) => {
                    let m = t.manifest();
                    tracing::info!(
                        plugin = %m.name,
                        dir = %t.dir().display(),
                        format = m.info.format.as_deref().unwrap_or_default(),
                        plugin_type = ?m.info.plugin_type,
                        timeout_ms = m.timeout.as_millis() as u64,
                        config_values = m.config.len(),
                        "plugin loaded"
                    );
                    names.push(m.name.clone());
                    loaded.tools.push(t);
                }
                Err(skipped) => {
                    tracing::warn!(
                        file = %skipped.file.display(),
                        field = %skipped.error.field,
                        "plugin skipped: {}",
                        skipped.error
                    );
                    loaded.skipped.push(skipped);
                }
            }
        }
    }
    loaded
}

enum Found {
    Plugin(PluginTool),
    Disabled(PathBuf),
}

/// The plugin of directory `dir`: `None` if it holds no manifest.
fn load_one(dir: &Path, taken: &[String]) -> Result<Option<Found>, Skipped> {
    let blocked = dir.join(manifest::VCP_MANIFEST_BLOCKED);
    if blocked.is_file() {
        return Ok(Some(Found::Disabled(blocked)));
    }
    let nex = dir.join(manifest::PLUGIN_JSON);
    let vcp = dir.join(manifest::VCP_MANIFEST);
    let (format, file) = match (nex.is_file(), vcp.is_file()) {
        (false, false) => return Ok(None),
        (true, false) => (Format::PluginJson, nex),
        (false, true) => (Format::Vcp, vcp),
        (true, true) => {
            return Err(Skipped {
                file: nex,
                error: manifest::error(
                    "(file)",
                    "and plugin-manifest.json are both present; keep one",
                ),
            });
        }
    };
    let skip = |file: &Path, error: manifest::Error| Skipped {
        file: file.to_path_buf(),
        error,
    };
    let text = read_text(&file).map_err(|e| skip(&file, e))?;
    let mut m = manifest::parse(format, &text).map_err(|e| skip(&file, e))?;
    if taken.contains(&m.name) {
        return Err(skip(
            &file,
            manifest::error(
                "name",
                format!("`{}` is already a tool of this node", m.name),
            ),
        ));
    }
    let env_file = dir.join(CONFIG_ENV);
    if env_file.is_file() {
        let text = read_text(&env_file).map_err(|e| skip(&env_file, e))?;
        let values = manifest::parse_env_file(&text).map_err(|e| skip(&env_file, e))?;
        for (k, v) in values.iter() {
            m.config.insert(k.to_owned(), v.to_owned());
        }
    }
    let dir = std::fs::canonicalize(dir).map_err(|e| {
        skip(
            &file,
            manifest::error("(dir)", format!("cannot resolve the directory: {e}")),
        )
    })?;
    let tool = PluginTool::new(m, dir);
    check_program(&tool).map_err(|reason| {
        let field = match format {
            Format::PluginJson => "entry_point",
            Format::Vcp => "entryPoint.command",
        };
        skip(&file, manifest::error(field, reason))
    })?;
    Ok(Some(Found::Plugin(tool)))
}

fn read_text(path: &Path) -> Result<String, manifest::Error> {
    use std::io::Read as _;
    let f = std::fs::File::open(path)
        .map_err(|e| manifest::error("(file)", format!("cannot be read: {e}")))?;
    let mut text = String::new();
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| manifest::error("(file)", format!("cannot be read: {e}")))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(manifest::error(
            "(file)",
            format!("is larger than {MAX_MANIFEST_BYTES} bytes"),
        ));
    }
    Ok(text)
}

/// The program must exist and be executable: a path as it is, a bare name in the node's `PATH`.
fn check_program(tool: &PluginTool) -> Result<(), String> {
    let program = tool.program();
    let shown = tool.manifest().command.first().cloned().unwrap_or_default();
    let found = crate::tools::shell::resolve_program(
        &program.to_string_lossy(),
        std::env::var_os("PATH").as_deref(),
    );
    match found {
        Some(_) => Ok(()),
        None => Err(format!(
            "names program `{shown}`, which is not an executable file{}",
            if shown.contains('/') {
                ""
            } else {
                " in the node's PATH"
            }
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use apex_protocol::PluginType;
    use parking_lot::Mutex;
    use serde_json::{Value, json};

    use super::*;
    use crate::tools::{Callback, Error, ProgressSink, Tool, ToolContext};

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn plugin_json(name: &str, command: &str, extra: &str) -> String {
        format!(r#"{{"name": "{name}", "version": "1.0", "entry_point": {command:?}{extra}}}"#)
    }

    fn one(dir: &Path) -> PluginTool {
        let mut l = load(&[dir.to_path_buf()], &[]);
        assert!(l.skipped.is_empty(), "{:?}", l.skipped);
        assert_eq!(l.tools.len(), 1);
        l.tools.remove(0)
    }

    async fn call(t: &PluginTool, args: Value) -> Result<Value, Error> {
        t.call(args, ToolContext::detached()).await
    }

    #[test]
    fn both_formats_load_and_bad_ones_are_skipped_naming_file_and_field() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(
            r,
            "a_good/plugin.json",
            &plugin_json("good", "sh run.sh", ""),
        );
        write(
            r,
            "b_vcp/plugin-manifest.json",
            r#"{"name": "Vcp", "pluginType": "asynchronous",
                "entryPoint": {"type": "sh", "command": "sh x.sh"},
                "communication": {"protocol": "stdio", "timeout": 100}}"#,
        );
        write(r, "c_notjson/plugin.json", "{ nope");
        write(r, "d_noname/plugin.json", r#"{"entry_point": "sh x"}"#);
        write(r, "e_clash/plugin.json", &plugin_json("echo", "sh x", ""));
        write(r, "f_dup/plugin.json", &plugin_json("good", "sh x", ""));
        write(
            r,
            "g_proto/plugin-manifest.json",
            r#"{"name": "p", "entryPoint": {"command": "sh x"}, "communication": {"protocol": "direct"}}"#,
        );
        write(
            r,
            "h_blocked/plugin-manifest.json.block",
            r#"{"name": "blocked", "entryPoint": {"command": "sh x"}}"#,
        );
        write(
            r,
            "i_noprog/plugin.json",
            &plugin_json("noprog", "no-such-program-xyz --a", ""),
        );
        write(
            r,
            "j_badenv/plugin.json",
            &plugin_json("badenv", "sh x", ""),
        );
        write(r, "j_badenv/config.env", "OK=1\nnot a pair\n");
        write(r, "k_not_a_plugin/readme.txt", "hello");
        write(
            r,
            "l_taken/plugin.json",
            &plugin_json("taken_by_node", "sh x", ""),
        );
        std::fs::write(r.join("stray-file.json"), "{}").unwrap();

        let l = load(&[r.to_path_buf()], &["taken_by_node".to_owned()]);
        let names: Vec<&str> = l.tools.iter().map(|t| t.name()).collect();
        assert_eq!(names, vec!["good", "Vcp"]);
        let vcp = &l.tools[1];
        assert_eq!(vcp.plugin().unwrap().plugin_type, PluginType::Asynchronous);
        assert_eq!(vcp.manifest().timeout, Duration::from_millis(100));
        assert_eq!(l.disabled, vec![r.join("h_blocked")]);
        let skipped: Vec<(String, String)> = l
            .skipped
            .iter()
            .map(|s| {
                (
                    s.file.strip_prefix(r).unwrap().display().to_string(),
                    s.error.field.clone(),
                )
            })
            .collect();
        assert_eq!(
            skipped,
            vec![
                ("c_notjson/plugin.json".into(), "(file)".into()),
                ("d_noname/plugin.json".into(), "name".into()),
                ("e_clash/plugin.json".into(), "name".into()),
                ("f_dup/plugin.json".into(), "name".into()),
                (
                    "g_proto/plugin-manifest.json".into(),
                    "communication.protocol".into()
                ),
                ("i_noprog/plugin.json".into(), "entry_point".into()),
                ("j_badenv/config.env".into(), "config.env:2".into()),
                ("l_taken/plugin.json".into(), "name".into()),
            ]
        );
        // What the warning says: the file, the field and the reason, on one line.
        let line = l.skipped[5].to_string();
        assert!(line.contains("i_noprog/plugin.json") && line.contains("`entry_point`"));
        assert!(line.contains("no-such-program-xyz"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_missing_plugin_dir_loads_nothing() {
        let l = load(&[PathBuf::from("/nonexistent/plugins")], &[]);
        assert!(l.tools.is_empty() && l.skipped.is_empty());
    }

    #[test]
    fn builtin_names_cover_every_built_in_tool() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::RawConfig {
            hub: vec!["ws://127.0.0.1:1".into()],
            key: Some("k".into()),
            file_roots: vec![dir.path().into()],
            allow_programs: vec!["sh".into()],
            ..Default::default()
        }
        .validate()
        .unwrap();
        for name in crate::tools::Registry::builtin(&config).unwrap().names() {
            assert!(BUILTIN_NAMES.contains(&name.as_str()), "{name}");
        }
    }

    #[tokio::test]
    async fn a_python_plugin_answers_over_stdio() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "wc/main.py",
            "import json, sys\nargs = json.load(sys.stdin)\n\
             print(json.dumps({'status': 'success', 'result': {'words': len(args['text'].split())}}))\n",
        );
        write(
            root.path(),
            "wc/plugin.json",
            &plugin_json("wc", "python3 main.py", ""),
        );
        let t = one(root.path());
        let out = call(&t, json!({"text": "one two three"})).await.unwrap();
        assert_eq!(out, json!({"words": 3}));
    }

    #[tokio::test]
    async fn the_answer_shapes() {
        let root = tempfile::tempdir().unwrap();
        // The script prints what the arguments ask for.
        write(
            root.path(),
            "p/run.sh",
            "#!/bin/sh\ncat > /dev/null\nprintf '%s' \"$OUT\"\n",
        );
        write(
            root.path(),
            "p/plugin.json",
            &plugin_json("p", "sh run.sh", ""),
        );
        let cases = [
            (
                r#"{"status":"success","result":{"n":1}}"#,
                Ok(json!({"n": 1})),
            ),
            (
                r#"{"status":"success","result":"r","messageForAI":"say r"}"#,
                Ok(json!({"result": "r", "messageForAI": "say r"})),
            ),
            (r#"{"status":"success"}"#, Ok(Value::Null)),
            ("plain text\n\n", Ok(json!("plain text"))),
            (r#"[1, 2]"#, Ok(json!([1, 2]))),
            (r#"{"other": true}"#, Ok(json!({"other": true}))),
            (
                r#"{"status":"error","error":"no such city"}"#,
                Err("plugin `p`: no such city".to_owned()),
            ),
            (
                r#"{"status":"error","error":{"code":7}}"#,
                Err(r#"plugin `p`: {"code":7}"#.to_owned()),
            ),
        ];
        for (printed, want) in cases {
            let mut m = one(root.path()).manifest().clone();
            m.config.insert("OUT".into(), printed.into());
            let t = PluginTool::new(m, root.path().join("p"));
            let got = call(&t, json!({})).await.map_err(|e| e.to_string());
            assert_eq!(got, want, "stdout {printed:?}");
        }
    }

    #[tokio::test]
    async fn a_non_zero_exit_fails_with_the_tail_of_stderr() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "p/run.sh",
            "echo '{\"status\":\"success\",\"result\":1}'\n\
             i=0; while [ $i -lt 300 ]; do echo \"noise $i\" >&2; i=$((i+1)); done\n\
             echo 'the real reason' >&2; exit 4\n",
        );
        write(
            root.path(),
            "p/plugin.json",
            &plugin_json("p", "sh run.sh", ""),
        );
        let e = call(&one(root.path()), json!({})).await.unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.code(), "task_execution_failed");
        assert!(msg.starts_with("plugin `p` exited with code 4: "), "{msg}");
        assert!(msg.ends_with("the real reason"), "{msg}");
        assert!(!msg.contains("noise 0\n"), "only the tail is kept");
        assert!(msg.len() < process::STDERR_TAIL_BYTES + 100);
    }

    #[tokio::test]
    async fn the_environment_is_the_documented_one() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "p/run.sh", "cat > /dev/null; env\n");
        write(
            root.path(),
            "p/plugin.json",
            &plugin_json(
                "p",
                "sh run.sh",
                r#", "config": {"FROM_MANIFEST": "m", "OVERRIDDEN": "manifest", "APEX_TASK_ID": "forged"}"#,
            ),
        );
        write(
            root.path(),
            "p/config.env",
            "OVERRIDDEN=env-file\nSECRET_TOKEN=\"s3 cr3t\"\n",
        );
        let t = one(root.path());
        assert!(
            !format!("{:?}", t.manifest()).contains("s3 cr3t"),
            "config values stay out of Debug output"
        );
        struct Nowhere;
        impl ProgressSink for Nowhere {
            fn report(&self, _: f64, _: Option<String>) {}
        }
        let ctx = ToolContext {
            progress: Arc::new(Nowhere),
            task_id: "task-42".into(),
            callback: Some(Callback {
                url: "http://hub/plugin-callback/p/task-42?token=t".into(),
                secret: "abc123".into(),
            }),
        };
        let out = t.call(json!({}), ctx).await.unwrap();
        let env: Vec<&str> = out.as_str().unwrap().lines().collect();
        let has = |l: &str| env.contains(&l);
        assert!(has("FROM_MANIFEST=m"), "{env:?}");
        assert!(has("OVERRIDDEN=env-file"), "config.env wins: {env:?}");
        assert!(has("SECRET_TOKEN=s3 cr3t"));
        assert!(has("APEX_TASK_ID=task-42"), "config cannot forge it");
        assert!(has("APEX_PLUGIN_NAME=p"));
        assert!(has(
            "APEX_CALLBACK_URL=http://hub/plugin-callback/p/task-42?token=t"
        ));
        assert!(has("APEX_CALLBACK_SECRET=abc123"));
        let pwd = format!(
            "PWD={}",
            std::fs::canonicalize(root.path().join("p"))
                .unwrap()
                .display()
        );
        assert!(has(&pwd), "runs in its directory: {env:?}");
        // Nothing of the node's own environment but the passed list.
        let allowed = |name: &str| {
            crate::tools::shell::PASSED_ENV.contains(&name)
                || [
                    "PWD",
                    "SHLVL",
                    "_",
                    "OLDPWD",
                    "FROM_MANIFEST",
                    "OVERRIDDEN",
                    "SECRET_TOKEN",
                ]
                .contains(&name)
                || name.starts_with("APEX_")
        };
        for line in &env {
            let name = line.split('=').next().unwrap();
            assert!(allowed(name), "unexpected variable {name}");
        }
        assert!(
            std::env::vars().any(|(k, _)| !allowed(&k)),
            "the test has variables to hide"
        );
    }

    #[tokio::test]
    async fn failures_are_retried_up_to_max_attempts() {
        let root = tempfile::tempdir().unwrap();
        // Fails until the third run, counting runs in a file of its directory.
        write(
            root.path(),
            "p/run.sh",
            "cat > /dev/null; echo x >> runs; n=$(wc -l < runs)\n\
             if [ \"$n\" -lt \"$SUCCEED_AT\" ]; then echo \"run $n failed\" >&2; exit 1; fi\n\
             echo \"{\\\"status\\\":\\\"success\\\",\\\"result\\\":$n}\"\n",
        );
        write(
            root.path(),
            "p/plugin.json",
            &plugin_json(
                "p",
                "sh run.sh",
                r#", "retry": {"max_attempts": 3, "backoff_ms": 1}"#,
            ),
        );
        let runs = root.path().join("p/runs");
        let base = one(root.path()).manifest().clone();
        let with = |succeed_at: &str| {
            let mut m = base.clone();
            m.config.insert("SUCCEED_AT".into(), succeed_at.into());
            PluginTool::new(m, root.path().join("p"))
        };
        assert_eq!(call(&with("3"), json!({})).await.unwrap(), json!(3));
        std::fs::remove_file(&runs).unwrap();
        let e = call(&with("4"), json!({})).await.unwrap_err();
        assert!(e.to_string().contains("run 3 failed"), "{e}");
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 3);
        // A reported error is retried as well; without `retry` there is one run.
        std::fs::remove_file(&runs).unwrap();
        let mut m = base.clone();
        m.retry = Default::default();
        m.config.insert("SUCCEED_AT".into(), "2".into());
        assert!(
            call(&PluginTool::new(m, root.path().join("p")), json!({}))
                .await
                .is_err()
        );
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1);
    }

    #[tokio::test]
    async fn a_timeout_is_not_retried_and_ends_task_timeout() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "p/run.sh", "echo x >> runs; exec sleep 300\n");
        write(
            root.path(),
            "p/plugin.json",
            &plugin_json(
                "p",
                "sh run.sh",
                r#", "timeout": 300, "retry": {"max_attempts": 3}"#,
            ),
        );
        let e = call(&one(root.path()), json!({})).await.unwrap_err();
        assert_eq!(e.code(), apex_protocol::codes::TASK_TIMEOUT);
        assert!(e.to_string().contains("300 ms"), "{e}");
        let runs = std::fs::read_to_string(root.path().join("p/runs")).unwrap();
        assert_eq!(runs.lines().count(), 1);
    }

    #[tokio::test]
    async fn dropping_the_call_kills_the_process_group() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "p/run.sh",
            "sleep 300 & echo $! > pids.tmp; echo $$ >> pids.tmp; mv pids.tmp pids; wait\n",
        );
        write(
            root.path(),
            "p/plugin.json",
            &plugin_json("p", "sh run.sh", ""),
        );
        let t = one(root.path());
        let pids = root.path().join("p/pids");
        let call = t.call(json!({}), ToolContext::detached());
        let wait_pids = async {
            loop {
                if let Ok(s) = tokio::fs::read_to_string(&pids).await {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let text = tokio::select! {
            r = call => panic!("the call ended: {r:?}"),
            s = wait_pids => s,
        };
        for pid in text.split_whitespace() {
            assert!(
                process::tests::gone(pid.parse().unwrap()).await,
                "process {pid} survived the drop"
            );
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Option<String>>>);
    impl ProgressSink for Recorder {
        fn report(&self, _: f64, message: Option<String>) {
            self.0.lock().push(message);
        }
    }

    #[tokio::test]
    async fn an_asynchronous_plugin_waits_for_its_callback() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "p/run.sh",
            "cat > /dev/null; echo \"{\\\"status\\\":\\\"success\\\",\\\"result\\\":{\\\"taskId\\\":\\\"$APEX_TASK_ID\\\",\\\"status\\\":\\\"pending\\\"}}\"\n",
        );
        write(
            root.path(),
            "p/plugin.json",
            &plugin_json("p", "sh run.sh", r#", "plugin_type": "asynchronous""#),
        );
        let t = one(root.path());
        // Without a callback the task fails at once, saying why.
        let e = call(&t, json!({})).await.unwrap_err();
        assert!(e.to_string().contains("no callback"), "{e}");
        // With one it reports progress and waits (until dropped).
        let rec = Arc::new(Recorder::default());
        let ctx = ToolContext {
            progress: rec.clone(),
            task_id: "t-1".into(),
            callback: Some(Callback {
                url: "http://hub/cb".into(),
                secret: "s".into(),
            }),
        };
        let fut = t.call(json!({}), ctx);
        let waited = async {
            loop {
                if !rec.0.lock().is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            r = fut => panic!("an asynchronous plugin's task ended by itself: {r:?}"),
            () = waited => {}
        }
        assert_eq!(
            rec.0.lock().clone(),
            vec![Some(tool::WAITING_MESSAGE.to_owned())]
        );
    }
}
