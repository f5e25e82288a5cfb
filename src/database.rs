//! The one place that knows every group's tables: opening the statistics database applies
//! the shared schema ([`crate::store::SCHEMA`]) and each group's own.

use crate::store::{Store, StoreError, reading};

impl Store {
    /// Opens (creating if needed) and migrates the database at `url` with every group's
    /// tables.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let store = Store::open_with(
            url,
            &[
                &crate::store::SCHEMA,
                &crate::aggregate::tables::SCHEMA,
                &crate::aggregate::rollups::SCHEMA,
                &crate::alert::tables::SCHEMA,
                &crate::aggregate::visits::SCHEMA,
            ],
        )
        .await?;
        let outdated = store
            .read(reading(|tx| {
                Box::pin(
                    async move { crate::aggregate::rollups::counted_before_rollups(&tx).await },
                )
            }))
            .await?;
        if outdated {
            return Err(StoreError::Refused {
                url: crate::secrets::redact(url),
                reason: "it holds counts written by a pageviews version without per-day \
                         rollups, which cannot be split by day, site and country for the \
                         filters; count into a new database (--database) and import the logs \
                         again, or delete this one"
                    .to_owned(),
            });
        }
        store.make_visit_salt().await?;
        Ok(store)
    }
}

#[cfg(test)]
mod tests;
