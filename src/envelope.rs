//! The canonical envelope: every postback becomes one CloudEvents 1.0 event in
//! structured JSON mode, so internal services parse one shape whatever Sinch sent.
//!
//! The schema lives in `schema/envelope.schema.json`; docs/http.md shows examples.

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::postback::Postback;

/// Media type of a structured-mode CloudEvent; targets receive it as Content-Type.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// One CloudEvents 1.0 event.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    /// Always `1.0`.
    pub specversion: &'static str,
    /// Relay-assigned ULID; the same for every target and every retry, so
    /// receivers can deduplicate on it.
    pub id: String,
    /// Configurable origin of the event (`envelope.source`).
    pub source: String,
    /// Derived from the postback's origin, e.g. `com.sinch.mms.mo`.
    #[serde(rename = "type")]
    pub event_type: &'static str,
    /// The tracking id, when Sinch sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Sinch's timestamp in RFC 3339 UTC, or the receive time when it has none
    /// or it does not parse.
    pub time: String,
    /// Always `application/json`: `data` is a JSON object.
    pub datacontenttype: &'static str,
    /// Extension: when the relay received the postback (RFC 3339 UTC).
    pub receivedtime: String,
    /// Extension: `xml` or `json`, the format Sinch used.
    pub sourceformat: &'static str,
    /// Every postback field under its canonical name, plus `files`.
    pub data: Map<String, Value>,
}

impl Envelope {
    /// Wraps a parsed postback; `id` and `received` come from the ingest side.
    pub fn new(postback: &Postback, id: String, source: &str, received: DateTime<Utc>) -> Envelope {
        let received_text = rfc3339(received);
        let time = postback
            .field("timestamp")
            .and_then(parse_timestamp)
            .map(rfc3339)
            .unwrap_or_else(|| received_text.clone());
        let mut data = postback.fields.clone();
        if !postback.files.is_empty() {
            let files = postback
                .files
                .iter()
                .map(|url| serde_json::json!({ "url": url }))
                .collect();
            data.insert("files".into(), Value::Array(files));
        }
        Envelope {
            specversion: "1.0",
            id,
            source: source.to_owned(),
            event_type: event_type(postback.origin()),
            subject: postback.tracking_id().map(str::to_owned),
            time,
            datacontenttype: "application/json",
            receivedtime: received_text,
            sourceformat: postback.format.as_str(),
            data,
        }
    }

    /// The bytes targets receive.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope is always serializable")
    }
}

/// CloudEvents `type` for a Sinch origin; unknown origins get the generic type.
pub fn event_type(origin: &str) -> &'static str {
    match origin.trim().to_ascii_uppercase().as_str() {
        "MMS_MO" => "com.sinch.mms.mo",
        "MMS_MT" => "com.sinch.mms.mt",
        "SMS_MO" => "com.sinch.sms.mo",
        "SMS_MT" => "com.sinch.sms.mt",
        _ => "com.sinch.postback",
    }
}

/// Parses the timestamps seen from Sinch: RFC 3339 with an offset or `Z`, with
/// or without fractions, and the same with a space instead of `T`. A time
/// without an offset is ambiguous and yields `None`, and so does one whose UTC
/// year RFC 3339 cannot write (outside 0000–9999: `%Y` also reads `-021` or
/// `+12345`, and `0000-01-01T00:00:00+01:00` is in year -1 in UTC).
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_rfc3339(&text.replacen(' ', "T", 1)))
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%z"))
        .ok()
        .map(|time| time.with_timezone(&Utc))
        .filter(|time| (0..=9999).contains(&time.year()))
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postback::parse;

    #[test]
    fn timestamps_in_every_seen_shape() {
        for (input, expected) in [
            ("2014-02-03T11:19:49-05:00", "2014-02-03T16:19:49Z"),
            (
                "2021-02-03T18:27:54.235957+00:00",
                "2021-02-03T18:27:54.235957Z",
            ),
            ("2021-02-03T18:27:54Z", "2021-02-03T18:27:54Z"),
            ("2021-02-03 18:27:54+01:00", "2021-02-03T17:27:54Z"),
            ("2021-02-03T18:27:54+0100", "2021-02-03T17:27:54Z"),
            ("2021-02-03 18:27:54+0100", "2021-02-03T17:27:54Z"),
        ] {
            assert_eq!(
                parse_timestamp(input).map(rfc3339).as_deref(),
                Some(expected),
                "{input}"
            );
        }
        assert_eq!(parse_timestamp("2021-02-03 18:27:54"), None);
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn envelope_attributes() {
        let postback = parse(
            br#"<postback><origin>MMS_MT</origin><code>N102</code><tracking-id>t1</tracking-id>
                <timestamp>2014-02-03T11:19:49-05:00</timestamp>
                <content><file>http://x/1.jpg</file></content></postback>"#,
            None,
        )
        .unwrap();
        let received = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let env = Envelope::new(&postback, "01ID".into(), "sinch:mms", received);
        let json: Value = serde_json::from_slice(&env.to_json()).unwrap();
        assert_eq!(json["type"], "com.sinch.mms.mt");
        assert_eq!(json["subject"], "t1");
        assert_eq!(json["time"], "2014-02-03T16:19:49Z");
        assert_eq!(json["receivedtime"], "2026-01-01T00:00:00Z");
        assert_eq!(json["sourceformat"], "xml");
        assert_eq!(
            json["data"]["files"],
            serde_json::json!([{"url": "http://x/1.jpg"}])
        );
        assert_eq!(json["data"]["timestamp"], "2014-02-03T11:19:49-05:00");
    }

    /// Found by `cargo fuzz run ingest` (fuzz/regressions/ingest/time-year-outside-rfc3339):
    /// `%Y` read the year `-1`, and `time` became `-0001-02-03T08:07:07Z`, which is
    /// not RFC 3339 (nor the schema's pattern).
    #[test]
    fn timestamps_outside_rfc3339_years_fall_back_to_receive_time() {
        let postback = parse(
            br#"{"origin":"O","code":"0","timestamp":"-1-2-3T8:7:7+0000"}"#,
            Some("application/json"),
        )
        .unwrap();
        let received = Utc::now();
        let env = Envelope::new(&postback, "x".into(), "s", received);
        assert_eq!(env.time, rfc3339(received));
        assert_eq!(env.data["timestamp"], "-1-2-3T8:7:7+0000");
        for input in [
            "-1-2-3T8:7:7+0000",
            "-2021-02-03T18:27:54+0000",
            "+12345-02-03T18:27:54+0000",
            "0000-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
        ] {
            assert_eq!(parse_timestamp(input), None, "{input}");
        }
        for (input, expected) in [
            ("0000-01-01T00:00:00Z", "0000-01-01T00:00:00Z"),
            ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(
                parse_timestamp(input).map(rfc3339).as_deref(),
                Some(expected),
                "{input}"
            );
        }
    }

    #[test]
    fn time_falls_back_to_receive_time() {
        let postback = parse(br#"{"origin":"MMS_MT","code":"E101"}"#, None).unwrap();
        let received = Utc::now();
        let env = Envelope::new(&postback, "x".into(), "s", received);
        assert_eq!(env.time, rfc3339(received));
        assert_eq!(env.subject, None);
        assert_eq!(env.event_type, "com.sinch.mms.mt");
        assert_eq!(event_type("weird"), "com.sinch.postback");
    }
}
