//! Property tests: no frame, however mangled, makes the decoder or the validator panic, and
//! every rejection carries one of the documented `error` codes.

use std::path::PathBuf;

use apex_protocol::codec::{decode_binary, decode_text};
use apex_protocol::{Encoding, Limits, NodeMessage, codec};
use proptest::prelude::*;

const CODES: [&str; 3] = ["invalid_json", "invalid_payload", "unknown_type"];

fn goldens() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .expect("golden dir")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("golden file"))
        .collect();
    out.sort();
    out
}

fn check_text(text: &str) {
    match decode_text::<NodeMessage>(text) {
        Ok(m) => {
            let _ = m.validate(&Limits::default());
            // Whatever decodes re-encodes in both encodings and decodes again.
            for enc in [Encoding::Json, Encoding::Msgpack] {
                let f = codec::encode(&m, enc).expect("encodes");
                assert_eq!(codec::decode::<NodeMessage>(&f).expect("round trip"), m);
            }
        }
        Err(e) => assert!(CODES.contains(&e.code()), "{e:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(s in ".{0,300}") {
        check_text(&s);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = decode_binary::<NodeMessage>(&b) {
            prop_assert!(CODES.contains(&e.code()), "{e:?}");
        }
    }

    #[test]
    fn mutated_golden_frames_never_panic(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let all = goldens();
        let mut bytes = all[pick.index(all.len())].clone().into_bytes();
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, byte),
            }
        }
        if let Ok(text) = std::str::from_utf8(&bytes) {
            check_text(text);
        }
        // The same frame as MessagePack, then mangled.
        if let Ok(m) = decode_text::<NodeMessage>(&all[pick.index(all.len())])
            && let Ok(codec::Frame::Binary(mut b)) = codec::encode(&m, Encoding::Msgpack)
        {
            let n = b.len();
            b.truncate(n / 2 + bytes.len() % (n / 2 + 1));
            if let Err(e) = decode_binary::<NodeMessage>(&b) {
                prop_assert!(CODES.contains(&e.code()), "{e:?}");
            }
        }
    }
}
