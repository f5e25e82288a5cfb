//! The one place that knows every group's tables: opening the statistics database applies
//! the shared schema ([`crate::store::SCHEMA`]) and each group's own.

use crate::store::{Store, StoreError};

impl Store {
    /// Opens (creating if needed) and migrates the database at `url` with every group's
    /// tables.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_with(
            url,
            &[
                &crate::store::SCHEMA,
                &crate::aggregate::tables::SCHEMA,
                &crate::alert::tables::SCHEMA,
            ],
        )
        .await
    }
}

#[cfg(test)]
mod tests;
