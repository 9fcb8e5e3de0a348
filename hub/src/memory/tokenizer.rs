//! The memory index's tokenizer (`apex`), used for indexed texts and queries alike:
//!
//! - a run of letters and digits outside CJK scripts is one token, lowercased (`Budget's` →
//!   `budget`, `s`);
//! - a run of CJK characters (Han, kana, Hangul) has no word boundaries to split on, so it
//!   gives every character (unigram) and every pair of neighbours (bigram): `春天的诗` →
//!   `春`, `春天`, `天`, `天的`, `的`, `的诗`, `诗`. A one-character query finds the
//!   character anywhere; a two-character word matches its bigram exactly, which BM25 scores
//!   above the scattered unigrams;
//! - everything else separates tokens; tokens over [`MAX_TOKEN_BYTES`] are dropped.

use tantivy::tokenizer::{Token, TokenStream, Tokenizer};

/// The name the tokenizer is registered under in the index.
pub const NAME: &str = "apex";

/// Longest token kept, in bytes.
pub const MAX_TOKEN_BYTES: usize = 255;

/// Whether `c` is written without spaces between words (CJK ideographs, kana, Hangul).
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF | 0x3040..=0x30FF | 0x3130..=0x318F | 0x31F0..=0x31FF
        | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF
        | 0x20000..=0x2FFFF)
}

/// The tokens of `text`, in order, with byte offsets and positions.
pub fn tokens(text: &str) -> Vec<Token> {
    let mut out: Vec<Token> = Vec::new();
    let push = |out: &mut Vec<Token>, from: usize, to: usize, s: String| {
        if s.is_empty() || s.len() > MAX_TOKEN_BYTES {
            return;
        }
        let position = out.len();
        out.push(Token {
            offset_from: from,
            offset_to: to,
            position,
            text: s,
            position_length: 1,
        });
    };
    let mut word = String::new();
    let mut word_from = 0;
    // The previous CJK character and its offset, while in a CJK run.
    let mut prev: Option<(char, usize)> = None;
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        if is_cjk(c) {
            if !word.is_empty() {
                push(&mut out, word_from, i, std::mem::take(&mut word));
            }
            if let Some((p, at)) = prev {
                let mut pair = String::with_capacity(8);
                pair.push(p);
                pair.push(c);
                push(&mut out, at, end, pair);
            }
            push(&mut out, i, end, c.to_string());
            prev = Some((c, i));
        } else {
            prev = None;
            if c.is_alphanumeric() {
                if word.is_empty() {
                    word_from = i;
                }
                word.extend(c.to_lowercase());
            } else if !word.is_empty() {
                push(&mut out, word_from, i, std::mem::take(&mut word));
            }
        }
    }
    if !word.is_empty() {
        push(&mut out, word_from, text.len(), word);
    }
    out
}

/// The distinct token texts of a query, in first-seen order.
pub fn query_terms(query: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    tokens(query)
        .into_iter()
        .map(|t| t.text)
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// The tokenizer as tantivy runs it.
#[derive(Debug, Clone, Default)]
pub struct ApexTokenizer;

/// The tokens of one text, handed out one by one.
pub struct ApexTokenStream {
    tokens: Vec<Token>,
    /// Index of the current token plus one (0: before the first).
    next: usize,
}

impl Tokenizer for ApexTokenizer {
    type TokenStream<'a> = ApexTokenStream;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> ApexTokenStream {
        ApexTokenStream {
            tokens: tokens(text),
            next: 0,
        }
    }
}

impl TokenStream for ApexTokenStream {
    fn advance(&mut self) -> bool {
        if self.next < self.tokens.len() {
            self.next += 1;
            true
        } else {
            false
        }
    }

    fn token(&self) -> &Token {
        &self.tokens[self
            .next
            .saturating_sub(1)
            .min(self.tokens.len().saturating_sub(1))]
    }

    fn token_mut(&mut self) -> &mut Token {
        let i = self
            .next
            .saturating_sub(1)
            .min(self.tokens.len().saturating_sub(1));
        &mut self.tokens[i]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn texts(s: &str) -> Vec<String> {
        tokens(s).into_iter().map(|t| t.text).collect()
    }

    #[test]
    fn words_are_lowercased_runs_of_letters_and_digits() {
        assert_eq!(
            texts("Schedule the Q3 report, for Monday's meeting!"),
            [
                "schedule", "the", "q3", "report", "for", "monday", "s", "meeting"
            ]
        );
        assert_eq!(texts("Ünïcödé  café"), ["ünïcödé", "café"]);
        assert!(texts("  ... --- !!! ").is_empty());
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(texts(&format!("a {long} b")), ["a", "b"]);
    }

    #[test]
    fn cjk_runs_give_unigrams_and_bigrams_with_offsets() {
        let t = tokens("写诗: 春天的诗");
        let got: Vec<(&str, usize, usize)> = t
            .iter()
            .map(|t| (t.text.as_str(), t.offset_from, t.offset_to))
            .collect();
        assert_eq!(
            got,
            [
                ("写", 0, 3),
                ("写诗", 0, 6),
                ("诗", 3, 6),
                ("春", 8, 11),
                ("春天", 8, 14),
                ("天", 11, 14),
                ("天的", 11, 17),
                ("的", 14, 17),
                ("的诗", 14, 20),
                ("诗", 17, 20),
            ]
        );
        assert!(t.iter().enumerate().all(|(i, t)| t.position == i));
        // Mixed scripts: Latin and digits split from the CJK run around them.
        assert_eq!(texts("2024年GPU"), ["2024", "年", "gpu"]);
        assert_eq!(
            texts("こんにちは"),
            ["こ", "こん", "ん", "んに", "に", "にち", "ち", "ちは", "は"]
        );
        assert_eq!(texts("한국어"), ["한", "한국", "국", "국어", "어"]);
    }

    #[test]
    fn query_terms_are_distinct() {
        assert_eq!(query_terms("the THE budget the"), ["the", "budget"]);
        assert_eq!(query_terms("春天"), ["春", "春天", "天"]);
    }

    #[test]
    fn the_tantivy_stream_yields_every_token_once() {
        let mut tk = ApexTokenizer;
        let mut s = tk.token_stream("hello 世界");
        let mut seen = Vec::new();
        while s.advance() {
            seen.push(s.token().text.clone());
        }
        assert_eq!(seen, ["hello", "世", "世界", "界"]);
        let mut empty = tk.token_stream("");
        assert!(!empty.advance());
    }
}
