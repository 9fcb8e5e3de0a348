//! File tools confined to the configured file roots: `file_read`, `file_list`, and `sha256`
//! (of a text or of a file).
//!
//! Confinement: a path is first normalised lexically (so `..` cannot climb out without touching
//! the file system) and must lie under a root, compared component by component; then every
//! file system access goes through a capability handle of that root (`cap_std::fs::Dir`, which
//! resolves the rest beneath the root, with `openat2(RESOLVE_BENEATH)` on Linux). A symlink
//! that leads outside is refused at the moment of the open itself, so swapping a symlink in
//! between a check and the open cannot escape: there is no separate check.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use cap_std::fs::Dir;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256 as Sha256Hasher};
use tokio::io::AsyncReadExt;

use super::{Error, Tool, ToolContext, ToolFuture, encode_bytes, parse_args, schema_of};

/// Default of `file_read.max_bytes` (1 MiB).
pub const DEFAULT_READ_BYTES: u64 = 1024 * 1024;
/// Largest `file_read.max_bytes` (16 MiB).
pub const MAX_READ_BYTES: u64 = 16 * 1024 * 1024;
/// Most entries `file_list` returns.
pub const MAX_LIST_ENTRIES: usize = 10_000;

/// One root: its canonical path and a capability handle opened on it at start.
#[derive(Debug)]
struct Root {
    path: PathBuf,
    dir: Arc<Dir>,
}

/// The directories file tools may touch (canonical paths).
#[derive(Debug, Clone, Default)]
pub struct FileRoots {
    roots: Arc<Vec<Root>>,
}

/// A path resolved under a root: what the tools open, list or hash, only through the root's
/// capability handle.
#[derive(Debug, Clone)]
pub struct Resolved {
    dir: Arc<Dir>,
    /// Relative to the root (`.` for the root itself).
    rel: PathBuf,
    /// The absolute path shown to clients (root joined with `rel`).
    shown: PathBuf,
}

/// Maps an I/O error of an access through a root: escapes (cap-std refuses them with
/// `PermissionDenied`) are `access_denied`.
fn io_error(e: &std::io::Error, what: &str, path: &str) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::Failed(format!("`{path}` does not exist")),
        std::io::ErrorKind::PermissionDenied => {
            Error::AccessDenied(format!("`{path}` is outside the allowed file roots ({e})"))
        }
        _ => Error::Failed(format!("cannot {what} `{path}`: {e}")),
    }
}

impl FileRoots {
    /// Roots from already canonical directories (as [`crate::config::Config`] holds them). A
    /// root that cannot be opened now is left out, with a warning.
    pub fn new(roots: Vec<PathBuf>) -> Self {
        let roots = roots
            .into_iter()
            .filter_map(
                |path| match Dir::open_ambient_dir(&path, cap_std::ambient_authority()) {
                    Ok(dir) => Some(Root {
                        path,
                        dir: Arc::new(dir),
                    }),
                    Err(e) => {
                        tracing::warn!(root = %path.display(), error = %e, "file root left out: cannot open it");
                        None
                    }
                },
            )
            .collect();
        Self {
            roots: Arc::new(roots),
        }
    }

    /// Whether no root is configured.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// Resolves `path` (absolute, or relative to the first root) under a root and checks that
    /// it exists there (following symlinks only while they stay beneath the root).
    ///
    /// # Errors
    /// [`Error::AccessDenied`] if the path lies outside every root (also through a symlink),
    /// [`Error::InvalidArguments`] for an empty path, [`Error::Failed`] if it does not exist.
    pub async fn resolve(&self, path: &str) -> Result<Resolved, Error> {
        if path.is_empty() {
            return Err(Error::InvalidArguments("`path` must not be empty".into()));
        }
        let Some(first) = self.roots.first() else {
            return Err(Error::AccessDenied("no file roots are configured".into()));
        };
        let given = Path::new(path);
        let joined = if given.is_absolute() {
            given.to_path_buf()
        } else {
            first.path.join(given)
        };
        let denied = || Error::AccessDenied(format!("`{path}` is outside the allowed file roots"));
        let lexical = normalize_lexically(&joined).ok_or_else(denied)?;
        let (root, rel) = self
            .roots
            .iter()
            .find_map(|r| lexical.strip_prefix(&r.path).ok().map(|rel| (r, rel)))
            .ok_or_else(denied)?;
        let rel = if rel.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rel.to_path_buf()
        };
        let resolved = Resolved {
            dir: root.dir.clone(),
            rel,
            shown: lexical.clone(),
        };
        let r = resolved.clone();
        let owned = path.to_owned();
        blocking(move || {
            r.dir
                .metadata(&r.rel)
                .map(|_| ())
                .map_err(|e| io_error(&e, "resolve", &owned))
        })
        .await?;
        Ok(resolved)
    }
}

/// Runs a blocking file system call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Failed(format!("file call failed: {e}")))?
}

impl Resolved {
    /// The absolute path shown to clients.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Opens the file for reading, beneath the root.
    ///
    /// # Errors
    /// [`Error::AccessDenied`] if it now leads outside the root, [`Error::Failed`] otherwise.
    pub async fn open(&self, shown: &str) -> Result<tokio::fs::File, Error> {
        let r = self.clone();
        let shown = shown.to_owned();
        blocking(move || {
            r.dir
                .open(&r.rel)
                .map(|f| tokio::fs::File::from_std(f.into_std()))
                .map_err(|e| io_error(&e, "open", &shown))
        })
        .await
    }

    /// The directory's entries, beneath the root: `(name, type, size)`, at most
    /// [`MAX_LIST_ENTRIES`] (and whether there were more).
    ///
    /// # Errors
    /// [`Error::AccessDenied`] if it leads outside the root, [`Error::Failed`] otherwise.
    async fn entries(
        &self,
        shown: &str,
    ) -> Result<(Vec<(String, &'static str, Option<u64>)>, bool), Error> {
        let r = self.clone();
        let shown = shown.to_owned();
        blocking(move || {
            let dir = r
                .dir
                .read_dir(&r.rel)
                .map_err(|e| io_error(&e, "list", &shown))?;
            let mut entries = Vec::new();
            let mut truncated = false;
            for entry in dir {
                let entry = entry.map_err(|e| io_error(&e, "list", &shown))?;
                if entries.len() == MAX_LIST_ENTRIES {
                    truncated = true;
                    break;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let (kind, size) = match entry.file_type() {
                    Ok(t) if t.is_symlink() => ("symlink", None),
                    Ok(t) if t.is_dir() => ("dir", None),
                    Ok(t) if t.is_file() => ("file", entry.metadata().ok().map(|m| m.len())),
                    _ => ("other", None),
                };
                entries.push((name, kind, size));
            }
            Ok((entries, truncated))
        })
        .await
    }
}

/// Removes `.` and resolves `..` without touching the file system; `None` if `..` climbs above
/// the file system root.
fn normalize_lexically(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

/// Arguments of `file_read`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileReadArgs {
    /// File to read: absolute, or relative to the first file root; must lie under a root.
    pub path: String,
    /// Most bytes to return (default 1 MiB, at most 16 MiB).
    #[serde(default)]
    #[schemars(range(min = 1, max = 16_777_216))]
    pub max_bytes: Option<u64>,
}

/// `file_read`: returns `{path, size, bytes, truncated, encoding, content}`.
pub struct FileRead {
    roots: FileRoots,
}

impl FileRead {
    /// A reader confined to `roots`.
    pub fn new(roots: FileRoots) -> Self {
        Self { roots }
    }
}

impl Tool for FileRead {
    fn name(&self) -> &'static str {
        "file_read"
    }
    fn description(&self) -> &'static str {
        "Reads a file under the node's file roots; returns {path, size, bytes, truncated, encoding, content}"
    }
    fn parameters(&self) -> Value {
        schema_of::<FileReadArgs>()
    }
    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        let roots = self.roots.clone();
        Box::pin(async move {
            let args: FileReadArgs = parse_args(args)?;
            let max = args.max_bytes.unwrap_or(DEFAULT_READ_BYTES);
            if !(1..=MAX_READ_BYTES).contains(&max) {
                return Err(Error::InvalidArguments(format!(
                    "`max_bytes` must be between 1 and {MAX_READ_BYTES}, got {max}"
                )));
            }
            let path = roots.resolve(&args.path).await?;
            let file = path.open(&args.path).await?;
            let meta = file
                .metadata()
                .await
                .map_err(|e| Error::Failed(format!("cannot stat `{}`: {e}", args.path)))?;
            if !meta.is_file() {
                return Err(Error::Failed(format!(
                    "`{}` is not a regular file",
                    args.path
                )));
            }
            let mut buf = Vec::new();
            file.take(max + 1)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| Error::Failed(format!("cannot read `{}`: {e}", args.path)))?;
            let truncated = buf.len() as u64 > max;
            buf.truncate(usize::try_from(max).unwrap_or(usize::MAX));
            let (content, encoding) = encode_bytes(&buf);
            Ok(json!({
                "path": path.path().to_string_lossy(),
                "size": meta.len(),
                "bytes": buf.len(),
                "truncated": truncated,
                "encoding": encoding,
                "content": content,
            }))
        })
    }
}

/// Arguments of `file_list`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileListArgs {
    /// Directory to list: absolute, or relative to the first file root; must lie under a root.
    pub path: String,
}

/// `file_list`: returns `{path, entries: [{name, type, size}], truncated}`, sorted by name.
pub struct FileList {
    roots: FileRoots,
}

impl FileList {
    /// A lister confined to `roots`.
    pub fn new(roots: FileRoots) -> Self {
        Self { roots }
    }
}

impl Tool for FileList {
    fn name(&self) -> &'static str {
        "file_list"
    }
    fn description(&self) -> &'static str {
        "Lists a directory under the node's file roots; returns {path, entries: [{name, type, size}]}"
    }
    fn parameters(&self) -> Value {
        schema_of::<FileListArgs>()
    }
    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        let roots = self.roots.clone();
        Box::pin(async move {
            let args: FileListArgs = parse_args(args)?;
            let path = roots.resolve(&args.path).await?;
            let (mut entries, truncated) = path.entries(&args.path).await?;
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let entries: Vec<Value> = entries
                .into_iter()
                .map(|(name, kind, size)| json!({"name": name, "type": kind, "size": size}))
                .collect();
            Ok(json!({
                "path": path.path().to_string_lossy(),
                "entries": entries,
                "truncated": truncated,
            }))
        })
    }
}

/// Arguments of `sha256`: exactly one of `text` and `path`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sha256Args {
    /// Text to hash (its UTF-8 bytes).
    #[serde(default)]
    pub text: Option<String>,
    /// File to hash; must lie under a file root.
    #[serde(default)]
    pub path: Option<String>,
}

/// `sha256`: returns `{sha256, bytes}` (lowercase hex digest, number of bytes hashed).
pub struct Sha256 {
    roots: FileRoots,
}

impl Sha256 {
    /// A hasher whose `path` form is confined to `roots`.
    pub fn new(roots: FileRoots) -> Self {
        Self { roots }
    }
}

impl Tool for Sha256 {
    fn name(&self) -> &'static str {
        "sha256"
    }
    fn description(&self) -> &'static str {
        "SHA-256 of a text or of a file under the node's file roots; returns {sha256, bytes}"
    }
    fn parameters(&self) -> Value {
        let mut schema = schema_of::<Sha256Args>();
        if let Some(obj) = schema.as_object_mut() {
            obj.insert(
                "oneOf".into(),
                json!([{"required": ["text"]}, {"required": ["path"]}]),
            );
        }
        schema
    }
    fn call(&self, args: Value, _ctx: ToolContext) -> ToolFuture {
        let roots = self.roots.clone();
        Box::pin(async move {
            let args: Sha256Args = parse_args(args)?;
            let (digest, bytes) = match (args.text, args.path) {
                (Some(text), None) => (Sha256Hasher::digest(text.as_bytes()), text.len() as u64),
                (None, Some(path)) => hash_file(&roots, &path).await?,
                _ => {
                    return Err(Error::InvalidArguments(
                        "exactly one of `text` and `path` is required".into(),
                    ));
                }
            };
            Ok(json!({ "sha256": hex::encode(digest), "bytes": bytes }))
        })
    }
}

async fn hash_file(
    roots: &FileRoots,
    path: &str,
) -> Result<(sha2::digest::Output<Sha256Hasher>, u64), Error> {
    let mut file = roots.resolve(path).await?.open(path).await?;
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| Error::Failed(format!("cannot read `{path}`: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize(), total))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        roots: FileRoots,
    }

    /// `<tmp>/root/{hello.txt, sub/inner.txt, escape -> <tmp>/outside}`, `<tmp>/outside/secret`.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("hello.txt"), "hello world").unwrap();
        std::fs::write(root.join("sub").join("inner.txt"), "inner").unwrap();
        std::fs::write(outside.join("secret"), "secret").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("secret-link")).unwrap();
        // A sibling whose name extends the root's: must not count as inside.
        std::fs::create_dir_all(base.join("root2")).unwrap();
        std::fs::write(base.join("root2").join("x"), "x").unwrap();
        let roots = FileRoots::new(vec![root.clone()]);
        Fixture {
            _dir: dir,
            root,
            outside,
            roots,
        }
    }

    #[tokio::test]
    async fn paths_inside_the_root_resolve() {
        let f = fixture();
        assert_eq!(
            f.roots.resolve("hello.txt").await.unwrap().path(),
            f.root.join("hello.txt")
        );
        let abs = f.root.join("sub").join("..").join("hello.txt");
        assert_eq!(
            f.roots.resolve(abs.to_str().unwrap()).await.unwrap().path(),
            f.root.join("hello.txt")
        );
        assert_eq!(f.roots.resolve(".").await.unwrap().path(), f.root);
    }

    #[tokio::test]
    async fn paths_outside_the_root_are_denied() {
        let f = fixture();
        let root2 = f.root.with_file_name("root2").join("x");
        let escapes = [
            "../outside/secret".to_owned(),
            "sub/../../outside/secret".to_owned(),
            "escape/secret".to_owned(),
            "secret-link".to_owned(),
            f.outside.join("secret").to_string_lossy().into_owned(),
            root2.to_string_lossy().into_owned(),
            "/etc/passwd".to_owned(),
            "/../../../../etc/passwd".to_owned(),
            "../does-not-exist".to_owned(),
        ];
        for p in escapes {
            let err = f.roots.resolve(&p).await.unwrap_err();
            assert_eq!(err.code(), "access_denied", "{p}: {err}");
        }
        let err = f.roots.resolve("missing.txt").await.unwrap_err();
        assert_eq!(err.code(), "task_execution_failed");
        let none = FileRoots::new(vec![]);
        assert_eq!(none.resolve("x").await.unwrap_err().code(), "access_denied");
    }

    #[tokio::test]
    async fn file_read_reads_and_truncates() {
        let f = fixture();
        let tool = FileRead::new(f.roots.clone());
        let out = tool
            .call(json!({"path": "hello.txt"}), ToolContext::detached())
            .await
            .unwrap();
        assert_eq!(out["content"], "hello world");
        assert_eq!(out["truncated"], false);
        let out = tool
            .call(
                json!({"path": "hello.txt", "max_bytes": 5}),
                ToolContext::detached(),
            )
            .await
            .unwrap();
        assert_eq!(out["content"], "hello");
        assert_eq!(out["truncated"], true);
        assert_eq!(out["size"], 11);
        let err = tool
            .call(json!({"path": "escape/secret"}), ToolContext::detached())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "access_denied");
        let err = tool
            .call(json!({"path": "sub"}), ToolContext::detached())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = tool
            .call(
                json!({"path": "hello.txt", "max_bytes": 0}),
                ToolContext::detached(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_arguments");
    }

    #[tokio::test]
    async fn file_list_lists() {
        let f = fixture();
        let out = FileList::new(f.roots.clone())
            .call(json!({"path": "."}), ToolContext::detached())
            .await
            .unwrap();
        let names: Vec<&str> = out["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["escape", "hello.txt", "secret-link", "sub"]);
        assert_eq!(out["entries"][1]["size"], 11);
        assert_eq!(out["entries"][0]["type"], "symlink");
        let err = FileList::new(f.roots.clone())
            .call(json!({"path": "escape"}), ToolContext::detached())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "access_denied");
    }

    #[tokio::test]
    async fn sha256_of_text_and_file() {
        let f = fixture();
        let tool = Sha256::new(f.roots.clone());
        let expected = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
        let out = tool
            .call(json!({"text": "hello world"}), ToolContext::detached())
            .await
            .unwrap();
        assert_eq!(out, json!({"sha256": expected, "bytes": 11}));
        let out = tool
            .call(json!({"path": "hello.txt"}), ToolContext::detached())
            .await
            .unwrap();
        assert_eq!(out, json!({"sha256": expected, "bytes": 11}));
        for args in [
            json!({}),
            json!({"text": "a", "path": "b"}),
            json!({"txt": "a"}),
        ] {
            let err = tool
                .call(args.clone(), ToolContext::detached())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "invalid_arguments", "{args}");
        }
        let err = tool
            .call(json!({"path": "secret-link"}), ToolContext::detached())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "access_denied");
    }

    /// A symlink to a file outside the root swapped in and out of place in a loop while the
    /// tools read the same path: every read answers the inside file or an error, never the
    /// outside file's content (there is no check-then-open window to race).
    #[tokio::test]
    async fn a_symlink_swapped_in_while_reading_never_escapes() {
        let f = fixture();
        let swap = f.root.join("swap");
        let inside = f.root.join("inside.txt");
        std::fs::write(&inside, "inside").unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, swap, inside) = (stop.clone(), swap.clone(), inside.clone());
            let secret = f.outside.join("secret");
            let staged = f.root.join("staged");
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Atomically replace `swap` with a hard copy of the inside file, then with
                    // a symlink to the secret.
                    let _ = std::fs::remove_file(&staged);
                    if std::fs::hard_link(&inside, &staged).is_ok() {
                        let _ = std::fs::rename(&staged, &swap);
                    }
                    let _ = std::fs::remove_file(&staged);
                    if std::os::unix::fs::symlink(&secret, &staged).is_ok() {
                        let _ = std::fs::rename(&staged, &swap);
                    }
                    swaps += 1;
                }
                swaps
            })
        };
        let read = FileRead::new(f.roots.clone());
        let hash = Sha256::new(f.roots.clone());
        let inside_digest = hex::encode(Sha256Hasher::digest(b"inside"));
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..2000 {
            match read
                .call(json!({"path": "swap"}), ToolContext::detached())
                .await
            {
                Ok(out) => {
                    assert_eq!(out["content"], "inside", "read outside the root: {out}");
                    ok += 1;
                }
                Err(_) => refused += 1,
            }
            if let Ok(out) = hash
                .call(json!({"path": "swap"}), ToolContext::detached())
                .await
            {
                assert_eq!(
                    out["sha256"],
                    inside_digest.as_str(),
                    "hashed outside the root"
                );
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        assert!(swaps > 0 && ok + refused == 2000);
    }
}
