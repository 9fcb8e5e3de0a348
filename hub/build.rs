//! Packs what the hub embeds, smaller (the image binaries have a 40 MB budget):
//! - OpenAI's BPE vocabularies (`o200k_base`, `cl100k_base`, from `tiktoken-rs`) into
//!   `$OUT_DIR/<name>.bpe.gz`, which `src/chat/tokens.rs` embeds;
//! - ReDoc's script (`assets/redoc/redoc.standalone.js`) gzipped into
//!   `$OUT_DIR/redoc.standalone.js.gz`, which `src/http/docs.rs` serves.
//!
//! `tiktoken-rs` embeds each vocabulary as base64 text with a decimal rank per line (3.6 MB
//! and 1.7 MB), which put the image binaries past their 40 MB budget. The packed form holds
//! the same tokens, in rank order, as raw bytes each preceded by its length (one byte), then
//! gzipped: about a quarter of the size. The tokenizer itself (the merge
//! algorithm, the split patterns) stays tiktoken-rs's; `tokens.rs` has a test that the two
//! agree token for token.

use std::path::{Path, PathBuf};

/// The vocabularies packed: name, constructor, number of ordinary tokens (ranks 0..n).
type Vocab = (
    &'static str,
    fn() -> anyhow::Result<tiktoken_rs::CoreBPE>,
    u32,
);

const VOCABS: [Vocab; 2] = [
    ("o200k_base", tiktoken_rs::o200k_base, 199_998),
    ("cl100k_base", tiktoken_rs::cl100k_base, 100_256),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    gzip(
        "assets/redoc/redoc.standalone.js",
        &out.join("redoc.standalone.js.gz"),
    );
    for (name, load, n) in VOCABS {
        let bpe = load().unwrap_or_else(|e| panic!("tiktoken-rs {name}: {e}"));
        let mut packed = Vec::with_capacity(n as usize * 8);
        for rank in 0..n {
            let bytes = bpe
                .decode_bytes(&[rank])
                .unwrap_or_else(|e| panic!("{name}: rank {rank} does not decode: {e}"));
            let len = u8::try_from(bytes.len())
                .ok()
                .filter(|l| *l > 0)
                .unwrap_or_else(|| panic!("{name}: rank {rank} is {} bytes", bytes.len()));
            packed.push(len);
            packed.extend_from_slice(&bytes);
        }
        write_gz(&packed, &out.join(format!("{name}.bpe.gz")));
    }
}

/// Writes `src` (relative to the crate) gzipped to `dst`.
fn gzip(src: &str, dst: &Path) {
    println!("cargo::rerun-if-changed={src}");
    let data = std::fs::read(src).unwrap_or_else(|e| panic!("reading {src}: {e}"));
    write_gz(&data, dst);
}

/// Writes `data` gzipped (best compression) to `dst`.
fn write_gz(data: &[u8], dst: &Path) {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data)
        .and_then(|()| gz.finish())
        .and_then(|bytes| std::fs::write(dst, bytes))
        .unwrap_or_else(|e| panic!("writing {}: {e}", dst.display()));
}
