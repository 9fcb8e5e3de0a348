//! The task list of the shared store ([`SharedRedis::list`]): every task of every hub, newest
//! or oldest first, from `index` and the listing indexes (`ix:*`) that every script writing a record
//! keeps (`scripts/reindex.lua`).

use super::{Error, PREFIX, SharedRedis, scripts, task_key};
use crate::model::{Task, TaskStatus};
use crate::store::Order;

impl SharedRedis {
    /// A page of every task in the shared store matching `filter` in `order` (by `seq`, the
    /// shared acceptance order; `page` from 1), and the exact number matching. No filter, one filter, or status with tool or with
    /// node read one sorted set (`index` or an `ix:*` listing index kept by the scripts): one
    /// script call reading the page's records, O(page + log n). Tool with node reads the
    /// smaller of the two indexes and filters the records (O(that index)).
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn list(
        &self,
        filter: &crate::store::TaskFilter,
        order: Order,
        page: usize,
        limit: usize,
    ) -> Result<crate::store::Page, Error> {
        let skip = page.saturating_sub(1).saturating_mul(limit);
        let ix = |k: String| format!("{PREFIX}ix:{k}");
        let status = filter.status.map(TaskStatus::as_str);
        if let Some(o) = filter.owner.as_deref() {
            // An owner's own tasks: exact when alone, else walked and filtered.
            let key = ix(format!("owner:{o}"));
            let alone = status.is_none() && filter.tool.is_none() && filter.node_id.is_none();
            if !alone {
                return self.list_scan(filter, order, &key, &key, skip, limit).await;
            }
            return self.list_index(&key, order, skip, limit).await;
        }
        let key = match (status, filter.tool.as_deref(), filter.node_id.as_deref()) {
            (None, None, None) => format!("{PREFIX}index"),
            (Some(s), None, None) => ix(format!("status:{s}")),
            (None, Some(t), None) => ix(format!("tool:{t}")),
            (None, None, Some(n)) => ix(format!("node:{n}")),
            (Some(s), Some(t), None) => ix(format!("st:{s}:{t}")),
            (Some(s), None, Some(n)) => ix(format!("sn:{s}:{n}")),
            (s, Some(t), Some(n)) => {
                let (by_tool, by_node) = match s {
                    Some(s) => (ix(format!("st:{s}:{t}")), ix(format!("sn:{s}:{n}"))),
                    None => (ix(format!("tool:{t}")), ix(format!("node:{n}"))),
                };
                return self
                    .list_scan(filter, order, &by_tool, &by_node, skip, limit)
                    .await;
            }
        };
        self.list_index(&key, order, skip, limit).await
    }

    /// A page of the listing index `key` (exact), in `order`.
    async fn list_index(
        &self,
        key: &str,
        order: Order,
        skip: usize,
        limit: usize,
    ) -> Result<crate::store::Page, Error> {
        let mut c = self.conn.clone();
        if limit == 0 {
            let total: u64 = redis::cmd("ZCARD")
                .arg(key)
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            return Ok(crate::store::Page {
                tasks: Vec::new(),
                total: usize::try_from(total).unwrap_or(usize::MAX),
            });
        }
        let rows: Vec<Vec<u8>> = scripts::LIST
            .key(key)
            .arg(skip)
            .arg(skip.saturating_add(limit - 1))
            .arg(format!("{PREFIX}task:"))
            .arg(match order {
                Order::NewestFirst => "desc",
                Order::OldestFirst => "asc",
            })
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut rows = rows.into_iter();
        let total = rows
            .next()
            .and_then(|t| std::str::from_utf8(&t).ok()?.parse().ok())
            .unwrap_or(0);
        let tasks = rows
            .filter_map(|raw| serde_json::from_slice::<Task>(&raw).ok())
            .collect();
        Ok(crate::store::Page { tasks, total })
    }

    /// [`SharedRedis::list`] for tool with node: walks the smaller of two listing indexes in
    /// `order`, reading records in batches of 500 and filtering them.
    async fn list_scan(
        &self,
        filter: &crate::store::TaskFilter,
        order: Order,
        a: &str,
        b: &str,
        skip: usize,
        limit: usize,
    ) -> Result<crate::store::Page, Error> {
        let mut c = self.conn.clone();
        let (na, nb): (u64, u64) = redis::pipe()
            .cmd("ZCARD")
            .arg(a)
            .cmd("ZCARD")
            .arg(b)
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut range = redis::cmd("ZRANGE");
        range.arg(if na <= nb { a } else { b }).arg(0).arg(-1);
        if order == Order::NewestFirst {
            range.arg("REV");
        }
        let ids: Vec<String> = range
            .query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut total = 0;
        let mut tasks = Vec::new();
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HGET").arg(task_key(id)).arg("record");
            }
            let rows: Vec<Option<Vec<u8>>> = pipe
                .query_async(&mut c)
                .await
                .map_err(|e| self.unavailable(e))?;
            for raw in rows.into_iter().flatten() {
                let Ok(t) = serde_json::from_slice::<Task>(&raw) else {
                    continue;
                };
                if !filter.matches(&t) {
                    continue;
                }
                if total >= skip && tasks.len() < limit {
                    tasks.push(t);
                }
                total += 1;
            }
        }
        Ok(crate::store::Page { tasks, total })
    }
}
