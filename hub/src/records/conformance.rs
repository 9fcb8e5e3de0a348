//! The conformance suite every record backend passes: [`check`] runs each case against one
//! store and panics naming the first that fails. Unit tests run it on memory and on a redb
//! file; `hub/tests/store_conformance.rs` runs it on a real `redis-server`, alone and with
//! two handles racing (as two hubs would).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)] // a test harness: a failure is a panic naming the case

use std::time::Duration;

use super::RecordStore;

/// Runs every case on `store`, whose kinds `conf_*` must be empty.
///
/// # Panics
/// On the first case that fails (the message names it).
pub async fn check(store: &RecordStore) {
    basics(store).await;
    compare_and_set(store).await;
    expiry(store).await;
    versions(store).await;
    logs(store).await;
}

/// Races `store_a` and `store_b` (handles of one backend, as two hubs hold) on one
/// compare-and-set: exactly one of 50 concurrent rotations from the same value wins.
///
/// # Panics
/// If not exactly one wins.
pub async fn check_race(store_a: &RecordStore, store_b: &RecordStore) {
    assert!(store_a.create("conf_race", "r", b"v0", None).await.unwrap());
    let mut tries = Vec::new();
    for i in 0..50 {
        let s = if i % 2 == 0 { store_a } else { store_b }.clone();
        tries.push(tokio::spawn(async move {
            let new = format!("v-{i}");
            s.compare_and_set("conf_race", "r", Some(b"v0"), Some(new.as_bytes()), None)
                .await
                .unwrap()
        }));
    }
    let mut won = 0;
    for t in tries {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1, "exactly one rotation from v0 wins");
}

async fn basics(s: &RecordStore) {
    assert_eq!(
        s.get("conf_a", "x").await.unwrap(),
        None,
        "absent reads None"
    );
    s.put("conf_a", "x", b"{\"n\":1}", None).await.unwrap();
    s.put("conf_a", "w|ith:odd\0id", b"a|b", None)
        .await
        .unwrap();
    assert_eq!(
        s.get("conf_a", "x").await.unwrap().as_deref(),
        Some(&b"{\"n\":1}"[..])
    );
    assert_eq!(
        s.get("conf_a", "w|ith:odd\0id").await.unwrap().as_deref(),
        Some(&b"a|b"[..]),
        "ids and values may hold the envelope separator"
    );
    assert_eq!(s.get("conf_b", "x").await.unwrap(), None, "kinds are apart");
    let ids: Vec<String> = s
        .list("conf_a")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["w|ith:odd\0id", "x"], "list in id order");
    assert!(
        s.delete("conf_a", "x").await.unwrap(),
        "delete reports a hit"
    );
    assert!(!s.delete("conf_a", "x").await.unwrap(), "and then a miss");
    assert_eq!(s.get("conf_a", "x").await.unwrap(), None);
    assert!(s.list("conf_b").await.unwrap().is_empty());
}

async fn compare_and_set(s: &RecordStore) {
    assert!(
        s.create("conf_c", "k", b"one", None).await.unwrap(),
        "create"
    );
    assert!(
        !s.create("conf_c", "k", b"two", None).await.unwrap(),
        "a second create loses"
    );
    assert!(
        !s.compare_and_set("conf_c", "k", Some(b"nope"), Some(b"x"), None)
            .await
            .unwrap(),
        "wrong expected value"
    );
    assert!(
        s.compare_and_set("conf_c", "k", Some(b"one"), Some(b"two"), None)
            .await
            .unwrap()
    );
    assert!(
        !s.compare_and_set("conf_c", "k", Some(b"one"), Some(b"three"), None)
            .await
            .unwrap(),
        "a stale rotation loses"
    );
    assert!(
        s.compare_and_set("conf_c", "k", Some(b"two"), None, None)
            .await
            .unwrap(),
        "compare-and-delete"
    );
    assert_eq!(s.get("conf_c", "k").await.unwrap(), None);
}

async fn expiry(s: &RecordStore) {
    s.put("conf_e", "short", b"v", Some(Duration::from_millis(150)))
        .await
        .unwrap();
    s.put("conf_e", "long", b"v", Some(Duration::from_secs(600)))
        .await
        .unwrap();
    assert!(s.get("conf_e", "short").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        s.get("conf_e", "short").await.unwrap(),
        None,
        "expired reads as absent"
    );
    let ids: Vec<String> = s
        .list("conf_e")
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["long"], "listing skips expired records");
    assert!(
        s.create("conf_e", "short", b"again", None).await.unwrap(),
        "an expired record can be created again"
    );
    assert!(
        !s.delete("conf_e", "gone").await.unwrap(),
        "deleting what never was is a miss"
    );
}

async fn versions(s: &RecordStore) {
    let v0 = s.version("conf_v").await.unwrap();
    s.put("conf_v", "a", b"1", None).await.unwrap();
    let v1 = s.version("conf_v").await.unwrap();
    assert!(v1 > v0, "a write bumps the version");
    assert!(!s.create("conf_v", "a", b"2", None).await.unwrap());
    assert_eq!(
        s.version("conf_v").await.unwrap(),
        v1,
        "a refused write leaves it"
    );
    s.delete("conf_v", "a").await.unwrap();
    assert!(s.version("conf_v").await.unwrap() > v1, "a delete bumps it");
}

async fn logs(s: &RecordStore) {
    assert_eq!(s.log_len("conf_l", "a").await.unwrap(), 0, "absent log");
    assert!(s.read_log("conf_l", "a", 0, 10).await.unwrap().is_empty());
    assert_eq!(
        s.append("conf_l", "a", vec![b"one".to_vec(), b"tw|o\0".to_vec()])
            .await
            .unwrap(),
        2,
        "append returns the last sequence number"
    );
    assert_eq!(
        s.append("conf_l", "a", vec![b"three".to_vec()])
            .await
            .unwrap(),
        3
    );
    assert_eq!(s.append("conf_l", "a", Vec::new()).await.unwrap(), 3);
    assert_eq!(
        s.append("conf_l", "a:b", vec![b"other".to_vec()])
            .await
            .unwrap(),
        1,
        "logs are apart"
    );
    assert_eq!(s.log_len("conf_l", "a").await.unwrap(), 3);
    let all = s.read_log("conf_l", "a", 0, 10).await.unwrap();
    assert_eq!(
        all,
        vec![
            (1, b"one".to_vec()),
            (2, b"tw|o\0".to_vec()),
            (3, b"three".to_vec())
        ],
        "entries in order, bytes as given"
    );
    assert_eq!(
        s.read_log("conf_l", "a", 1, 1).await.unwrap(),
        vec![(2, b"tw|o\0".to_vec())],
        "after and limit"
    );
    assert!(s.read_log("conf_l", "a", 3, 10).await.unwrap().is_empty());
    assert!(
        s.log_footprint("conf_l", "a")
            .await
            .unwrap()
            .is_some_and(|b| b > 0)
    );
    assert!(s.delete_log("conf_l", "a").await.unwrap(), "a hit");
    assert!(!s.delete_log("conf_l", "a").await.unwrap(), "then a miss");
    assert_eq!(s.log_len("conf_l", "a").await.unwrap(), 0);
    assert_eq!(
        s.append("conf_l", "a", vec![b"again".to_vec()])
            .await
            .unwrap(),
        1,
        "a deleted log starts again at 1"
    );
    assert_eq!(
        s.read_log("conf_l", "a:b", 0, 10).await.unwrap(),
        vec![(1, b"other".to_vec())],
        "deleting one log leaves another"
    );
}

/// Races `store_a` and `store_b` on one log: 40 concurrent appends of 2 entries each get
/// distinct, gapless sequence numbers, each pair kept together.
///
/// # Panics
/// If a number repeats or a pair is split.
pub async fn check_log_race(store_a: &RecordStore, store_b: &RecordStore) {
    let mut tries = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { store_a } else { store_b }.clone();
        tries.push(tokio::spawn(async move {
            let e = vec![format!("{i}-a").into_bytes(), format!("{i}-b").into_bytes()];
            s.append("conf_lrace", "l", e).await.unwrap()
        }));
    }
    let mut lasts = Vec::new();
    for t in tries {
        lasts.push(t.await.unwrap());
    }
    lasts.sort_unstable();
    assert_eq!(lasts, (1..=40).map(|n| n * 2).collect::<Vec<u64>>());
    let all = store_a.read_log("conf_lrace", "l", 0, 1000).await.unwrap();
    assert_eq!(all.len(), 80);
    for pair in all.chunks(2) {
        let a = String::from_utf8(pair[0].1.clone()).unwrap();
        let b = String::from_utf8(pair[1].1.clone()).unwrap();
        assert_eq!(
            a.replace("-a", "-b"),
            b,
            "an append's entries stay together"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_records_conform() {
        let s = RecordStore::memory();
        check(&s).await;
        check_race(&s, &s.clone()).await;
        check_log_race(&s, &s.clone()).await;
    }

    #[tokio::test]
    async fn embedded_records_conform_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RecordStore::embedded(dir.path()).unwrap();
            check(&s).await;
            check_race(&s, &s.clone()).await;
            check_log_race(&s, &s.clone()).await;
            s.append("conf_keep", "l", vec![b"kept".to_vec()])
                .await
                .unwrap();
            s.put("conf_keep", "k", b"kept", None).await.unwrap();
        }
        let s = RecordStore::embedded(dir.path()).unwrap();
        assert_eq!(
            s.get("conf_keep", "k").await.unwrap().as_deref(),
            Some(&b"kept"[..])
        );
        assert_eq!(
            s.read_log("conf_keep", "l", 0, 5).await.unwrap(),
            vec![(1, b"kept".to_vec())],
            "logs survive reopening"
        );
    }

    #[tokio::test]
    async fn a_file_that_is_not_redb_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(super::super::FILE_NAME), b"not a database").unwrap();
        let err = RecordStore::embedded(dir.path()).unwrap_err();
        assert!(
            matches!(err, crate::store::Error::Unreadable { .. }),
            "{err}"
        );
    }
}
