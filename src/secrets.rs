//! No secret in any output. Database, SMTP and webhook URLs carry credentials (a password, or
//! for a Slack webhook the token that is its path), and every error, log line and stored
//! error that names one goes through [`redact`]; options that can carry one hide their
//! environment values in `--help`.

/// `url` as it may be shown: the password of any URL replaced by `***`; a URL that is not a
/// database's or a mail server's cut after its host and port (a webhook's path and query are
/// its token); `password=` values of a query or of a `key=value` connection string replaced. Text that is not a URL keeps
/// everything but `password=` values.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.has_host() => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let keeps_path = matches!(
                u.scheme(),
                "postgres"
                    | "postgresql"
                    | "postgress"
                    | "sqlite"
                    | "mysql"
                    | "mariadb"
                    | "smtp"
                    | "smtps"
            );
            if !keeps_path {
                let path = (u.path() != "/" || u.query().is_some() || u.fragment().is_some())
                    .then_some("/***");
                u.set_query(None);
                u.set_fragment(None);
                u.set_path("");
                let mut shown = u.to_string();
                if let Some(p) = path {
                    shown = shown.trim_end_matches('/').to_owned() + p;
                }
                return shown;
            }
            if u.query().is_some() {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if is_secret_key(&k) {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        _ => url
            .split(' ')
            .map(|word| match word.split_once('=') {
                Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                _ => word.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn is_secret_key(key: &str) -> bool {
    matches!(
        key.to_ascii_lowercase().as_str(),
        "password" | "sslpassword" | "token" | "secret"
    )
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn urls_lose_their_secrets() {
        for (url, shown) in [
            (
                "postgres://u:pw9@db.example/stats",
                "postgres://u:***@db.example/stats",
            ),
            ("postgress://u:pw9@h/db", "postgress://u:***@h/db"),
            (
                "postgres://u@h/db?sslmode=require&password=pw9",
                "postgres://u@h/db?sslmode=require&password=***",
            ),
            (
                "host=h user=u password=pw9 dbname=d",
                "host=h user=u password=*** dbname=d",
            ),
            (
                "smtp://u:hunter2@mail.example:587?tls=required",
                "smtp://u:***@mail.example:587?tls=required",
            ),
            (
                "https://hooks.slack.com/services/T000/B000/XXXXSECRET",
                "https://hooks.slack.com/***",
            ),
            ("http://127.0.0.1:9/hook?key=abc", "http://127.0.0.1:9/***"),
            ("http://127.0.0.1:9/", "http://127.0.0.1:9/"),
            ("ftp://hooks.example/S3CRET", "ftp://hooks.example/***"),
            (
                "sqlite://pageviews-data/pageviews.db",
                "sqlite://pageviews-data/pageviews.db",
            ),
        ] {
            assert_eq!(redact(url), shown, "{url}");
            for secret in ["pw9", "hunter2", "XXXXSECRET", "abc", "S3CRET"] {
                assert!(!redact(url).contains(secret), "{url}");
            }
        }
    }
}
