//! Shared mode's Lua scripts, one file each in `scripts/`; each file opens with a header giving
//! what it does, its `KEYS`, its `ARGV` and its reply. Each is hashed once (`EVALSHA`, falling
//! back to `EVAL` the first time a Redis has not seen it).
//!
//! A script that writes a task record must keep the listing indexes in the same atomic step:
//! its text is the `apex_reindex` prelude (`scripts/reindex.lua`) followed by its own file,
//! joined at compile time with `concat!`. That keeps every script a constant (one hash, no
//! building at start) and a missing or renamed file a build error; the prelude is a local Lua
//! function, so each script must carry it (Redis scripts share no code, and `FUNCTION LOAD`
//! would need Redis 7).

use std::sync::LazyLock;

use redis::Script;

/// Declares each script as a `static` [`Script`] (hashed on first use) and, for the tests, the
/// list of their texts.
macro_rules! scripts {
    ($($(#[$doc:meta])* $name:ident = $text:expr;)+) => {
        $(
            $(#[$doc])*
            pub(super) static $name: LazyLock<Script> = LazyLock::new(|| Script::new($text));
        )+
        /// Every script's name and text.
        #[cfg(test)]
        const ALL: &[(&str, &str)] = &[$((stringify!($name), $text)),+];
    };
}

scripts! {
    /// Store and queue one task (`submit.lua`).
    SUBMIT = concat!(include_str!("scripts/reindex.lua"), include_str!("scripts/submit.lua"));
    /// Store and queue a batch, all or none (`submit_batch.lua`).
    SUBMIT_BATCH = concat!(
        include_str!("scripts/reindex.lua"),
        include_str!("scripts/submit_batch.lua")
    );
    /// Claim from several queues (`claim_many.lua`).
    CLAIM_MANY = include_str!("scripts/claim_many.lua");
    /// Fenced write of one held task (`commit.lua`).
    COMMIT = concat!(include_str!("scripts/reindex.lua"), include_str!("scripts/commit.lua"));
    /// Fenced writes of many held tasks (`commit_batch.lua`).
    COMMIT_BATCH = concat!(
        include_str!("scripts/reindex.lua"),
        include_str!("scripts/commit_batch.lua")
    );
    /// Finish a task no hub claimed (`finish_queued.lua`).
    FINISH_QUEUED = concat!(
        include_str!("scripts/reindex.lua"),
        include_str!("scripts/finish_queued.lua")
    );
    /// Renew the hub's lease (`renew.lua`).
    RENEW = include_str!("scripts/renew.lua");
    /// Delete the hub's lease (`leave.lua`).
    LEAVE = include_str!("scripts/leave.lua");
    /// Requeue (or fail) a dead hub's task (`requeue.lua`).
    REQUEUE = concat!(include_str!("scripts/reindex.lua"), include_str!("scripts/requeue.lua"));
    /// Forget a dead hub with nothing left (`forget_hub.lua`).
    FORGET_HUB = include_str!("scripts/forget_hub.lua");
    /// Hand a dead hub's claim over (`take_over.lua`).
    TAKE_OVER = include_str!("scripts/take_over.lua");
    /// Retention (`collect.lua`).
    COLLECT = concat!(include_str!("scripts/reindex.lua"), include_str!("scripts/collect.lua"));
    /// A page of a listing index (`list.lua`).
    LIST = include_str!("scripts/list.lua");
}

#[cfg(test)]
mod tests {
    use super::ALL;

    const PRELUDE: &str = include_str!("scripts/reindex.lua");

    /// Each script's own file, without the prelude.
    fn own(text: &str) -> &str {
        text.strip_prefix(PRELUDE).unwrap_or(text)
    }

    #[test]
    fn every_script_opens_with_its_header() {
        for (name, text) in ALL {
            let file = format!("{}.lua", name.to_lowercase());
            let own = own(text);
            assert!(
                own.starts_with(&format!("-- {file}: ")),
                "{name}: no header"
            );
            let header: Vec<&str> = own.lines().take_while(|l| l.starts_with("--")).collect();
            assert!(
                header.iter().any(|l| l.starts_with("-- KEYS[1] ")),
                "{name}"
            );
            assert!(
                header.iter().any(|l| l.starts_with("-- ARGV[1] ")),
                "{name}"
            );
            assert!(header.iter().any(|l| l.starts_with("-- Reply: ")), "{name}");
        }
        assert!(PRELUDE.starts_with("-- reindex.lua: "));
    }

    /// A script that calls `apex_reindex` carries the prelude defining it, and only those do.
    #[test]
    fn scripts_that_reindex_carry_the_prelude() {
        for (name, text) in ALL {
            assert_eq!(
                own(text).contains("apex_reindex("),
                text.starts_with(PRELUDE),
                "{name}"
            );
        }
    }
}
