//! Token counts of messages: OpenAI's BPE encodings (`o200k_base` for GPT-4o, GPT-4.1, GPT-5
//! and the o-series; `cl100k_base` for GPT-4 and GPT-3.5) through `tiktoken-rs`, each loaded
//! once on first use from the compact copy `build.rs` packs (tiktoken-rs's own embedded text
//! is four times the size); for every other model an estimate (a token per 4 bytes of ASCII text,
//! a token per other character, the density of CJK text in common BPEs). Counts are made once
//! per message when it is stored and kept with it, so context statistics are O(1).

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

/// How a model's text is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `o200k_base`.
    O200k,
    /// `cl100k_base`.
    Cl100k,
    /// No known tokenizer: [`estimate`].
    Estimate,
}

/// Tokens a message costs beyond its text (role and separators), as OpenAI counts chat
/// messages.
pub const MESSAGE_OVERHEAD: u64 = 4;

/// The encoding of a model name (the part after a `provider/` prefix; case-insensitive).
pub fn encoding_for(model: &str) -> Encoding {
    let m = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    let o200k = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "o1",
        "o3",
        "o4",
        "chatgpt-4o",
    ];
    if o200k.iter().any(|p| m.starts_with(p)) {
        Encoding::O200k
    } else if m.starts_with("gpt-4")
        || m.starts_with("gpt-3.5")
        || m.starts_with("text-embedding-3")
    {
        Encoding::Cl100k
    } else {
        Encoding::Estimate
    }
}

fn bpe(enc: Encoding) -> Option<&'static CoreBPE> {
    static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    match enc {
        Encoding::O200k => O200K
            .get_or_init(|| {
                unpack(
                    O200K_PACKED,
                    &[("<|endoftext|>", 199_999), ("<|endofprompt|>", 200_018)],
                    tiktoken_rs::O200K_BASE_PAT_STR,
                )
            })
            .as_ref(),
        Encoding::Cl100k => CL100K
            .get_or_init(|| {
                unpack(
                    CL100K_PACKED,
                    &[
                        ("<|endoftext|>", 100_257),
                        ("<|fim_prefix|>", 100_258),
                        ("<|fim_middle|>", 100_259),
                        ("<|fim_suffix|>", 100_260),
                        ("<|endofprompt|>", 100_276),
                    ],
                    CL100K_PAT_STR,
                )
            })
            .as_ref(),
        Encoding::Estimate => None,
    }
}

/// `o200k_base` as `build.rs` packs it: gzip of every token's bytes in rank order, each
/// preceded by its length in one byte.
const O200K_PACKED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.bpe.gz"));
/// `cl100k_base`, packed the same way.
const CL100K_PACKED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.bpe.gz"));

/// `cl100k_base`'s split pattern (as in tiktoken and tiktoken-rs, which has no constant for it).
const CL100K_PAT_STR: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// A tiktoken-rs BPE from a packed vocabulary, its special tokens and split pattern; `None`
/// (and a warning) if the data does not unpack, so counts fall back to the estimate.
fn unpack(packed: &[u8], specials: &[(&str, u32)], pattern: &str) -> Option<CoreBPE> {
    let mut raw = Vec::new();
    let built = std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(packed), &mut raw)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            let mut tokens = Vec::new();
            let mut rest = raw.as_slice();
            while let Some((&len, tail)) = rest.split_first() {
                let (token, tail) = tail
                    .split_at_checked(usize::from(len))
                    .ok_or("a token runs past the end")?;
                tokens.push(token.to_vec());
                rest = tail;
            }
            let encoder = tokens.into_iter().zip(0..).collect();
            let specials = specials
                .iter()
                .map(|(s, r)| ((*s).to_owned(), *r))
                .collect();
            CoreBPE::new(encoder, specials, pattern).map_err(|e| e.to_string())
        });
    match built {
        Ok(bpe) => Some(bpe),
        Err(e) => {
            tracing::warn!(error = %e, "a packed BPE vocabulary did not load; estimating tokens");
            None
        }
    }
}

/// The tokens of `text` in `enc` (the estimate when the encoding could not be loaded).
pub fn count(enc: Encoding, text: &str) -> u64 {
    match bpe(enc) {
        Some(b) => b.encode_ordinary(text).len() as u64,
        None => estimate(text),
    }
}

/// The estimate for models without a known tokenizer: ASCII bytes / 4 (rounded up) plus one
/// token per non-ASCII character.
pub fn estimate(text: &str) -> u64 {
    let mut ascii = 0u64;
    let mut other = 0u64;
    for c in text.chars() {
        if c.is_ascii() {
            ascii += 1;
        } else {
            other += 1;
        }
    }
    ascii.div_ceil(4) + other
}

/// The tokens a chat message of `text` costs in a prompt: its text plus [`MESSAGE_OVERHEAD`].
pub fn message_tokens(model: &str, text: &str) -> u64 {
    count(encoding_for(model), text) + MESSAGE_OVERHEAD
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn openai_families_use_their_bpe() {
        assert_eq!(encoding_for("gpt-4o-mini"), Encoding::O200k);
        assert_eq!(encoding_for("openai/gpt-4.1"), Encoding::O200k);
        assert_eq!(encoding_for("gpt-4-turbo"), Encoding::Cl100k);
        assert_eq!(encoding_for("gpt-3.5-turbo"), Encoding::Cl100k);
        assert_eq!(encoding_for("llama3.2:1b"), Encoding::Estimate);
        assert_eq!(count(Encoding::O200k, "hello world"), 2);
        assert_eq!(count(Encoding::Cl100k, "hello world"), 2);
        assert_eq!(count(Encoding::O200k, ""), 0);
    }

    /// The packed vocabularies tokenize exactly as tiktoken-rs's own (linked into this test
    /// binary only).
    #[test]
    fn the_packed_vocabularies_agree_with_tiktoken_rs() {
        let texts = [
            "hello world",
            "The quick brown fox jumps over the lazy dog's back, 1234567 times!\n\n  ok",
            "fn main() { println!(\"{}\", 42_u64.pow(3)); }\r\n\t// comment",
            "春天来了，花开了。東京は晴れです。안녕하세요",
            "emoji 🦀🚀 and accents: naïve café ÆØÅ — “quotes”",
            "<|endoftext|> is ordinary text here",
        ];
        for (enc, reference) in [
            (Encoding::O200k, tiktoken_rs::o200k_base().unwrap()),
            (Encoding::Cl100k, tiktoken_rs::cl100k_base().unwrap()),
        ] {
            let packed = bpe(enc).expect("the packed vocabulary loads");
            for t in texts {
                assert_eq!(
                    packed.encode_ordinary(t),
                    reference.encode_ordinary(t),
                    "{enc:?}: {t}"
                );
            }
        }
    }

    #[test]
    fn the_estimate_counts_cjk_per_character() {
        assert_eq!(estimate("abcd"), 1);
        assert_eq!(estimate("abcde"), 2);
        assert_eq!(estimate("春天来了"), 4);
        assert_eq!(estimate(""), 0);
    }
}
