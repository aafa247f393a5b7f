//! The real binary: crash (SIGKILL) and restart on the same store, graceful
//! shutdown (SIGTERM), `check-config`, and JSON logs. Runs on SQLite, and on
//! PostgreSQL with `RELAY_TEST_BACKEND=postgres`.
//!
//! The harness (the process guard, the load senders and their books) is in
//! `common/process.rs`, shared with the fault tests in `faults/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::common::process::*;
use crate::common::*;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

mod check_config;
mod files_and_logs;
mod reload;
mod restart;
