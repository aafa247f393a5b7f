use bytes::Bytes;

use super::*;

fn postback(id: &str, content_type: Option<&str>, targets: &[&str]) -> NewPostback {
    NewPostback {
        id: id.into(),
        dedupe_key: format!("MMS_MO|N401|{id}"),
        received_at_ms: 1_700_000_000_123,
        envelope: Bytes::from_static(b"{\"specversion\":\"1.0\"}"),
        raw_body: Bytes::from_static(b"<postback/>"),
        content_type: content_type.map(str::to_owned),
        targets: targets.iter().map(|t| (*t).to_owned()).collect(),
        tracking_id: None,
    }
}

#[test]
fn records_read_back_as_written_and_a_torn_tail_is_dropped() {
    let mut segment = Vec::new();
    let mut buffer = Vec::new();
    let written = [
        postback("a", Some("text/xml"), &["crm", "archive"]),
        postback("b", None, &[]),
    ];
    for (seq, record) in written.iter().enumerate() {
        encode(seq as u64 + 7, record, &mut buffer);
        segment.extend_from_slice(&buffer);
    }
    let whole = segment.len();
    encode(9, &postback("c", None, &["crm"]), &mut buffer);
    segment.extend_from_slice(&buffer[..buffer.len() - 3]);

    let decoded = decode_all(&segment);
    assert!(decoded.torn);
    assert_eq!(decoded.skipped_bytes, 0, "a torn tail is not damage");
    let read = decoded.records;
    assert_eq!(read.len(), 2);
    for (record, (seq, original)) in read.iter().zip([(7, &written[0]), (8, &written[1])]) {
        assert_eq!(record.seq, seq);
        let got = &record.postback;
        assert_eq!(got.id, original.id);
        assert_eq!(got.dedupe_key, original.dedupe_key);
        assert_eq!(got.received_at_ms, original.received_at_ms);
        assert_eq!(got.envelope, original.envelope);
        assert_eq!(got.raw_body, original.raw_body);
        assert_eq!(got.content_type, original.content_type);
        assert_eq!(got.targets, original.targets);
    }
    assert!(!decode_all(&segment[..whole]).torn);
    // Zeros after the last record (a written-out segment) end it cleanly.
    let mut written_out = segment[..whole].to_vec();
    written_out.extend_from_slice(&[0; 4096]);
    let decoded = decode_all(&written_out);
    assert_eq!((decoded.records.len(), decoded.torn), (2, false));
    assert_eq!(decoded.skipped_bytes, 0);
    // A torn last record in a written-out segment is still only torn.
    let mut torn_out = segment.clone();
    torn_out.extend_from_slice(&[0; 4096]);
    let decoded = decode_all(&torn_out);
    assert_eq!(
        (decoded.records.len(), decoded.torn, decoded.skipped_bytes),
        (2, true, 0)
    );
}

/// `count` records (sequence numbers 1…) framed one after the other,
/// followed by zeros as in a written-out segment; and where each starts.
fn segment_of(count: u64) -> (Vec<u8>, Vec<usize>) {
    let (mut segment, mut starts, mut buffer) = (Vec::new(), Vec::new(), Vec::new());
    for seq in 1..=count {
        encode(
            seq,
            &postback(&format!("p{seq}"), None, &["crm"]),
            &mut buffer,
        );
        starts.push(segment.len());
        segment.extend_from_slice(&buffer);
    }
    segment.extend_from_slice(&[0; 64 * 1024]);
    (segment, starts)
}

fn ids(records: &[Journaled]) -> Vec<&str> {
    records.iter().map(|r| r.postback.id.as_str()).collect()
}

#[test]
fn damage_in_the_middle_is_stepped_over_to_the_next_valid_record() {
    // A flipped bit in the second of five records.
    let (mut segment, starts) = segment_of(5);
    segment[starts[1] + 20] ^= 0x40;
    let decoded = decode_all(&segment);
    assert_eq!(ids(&decoded.records), ["p1", "p3", "p4", "p5"]);
    assert!(!decoded.torn);
    assert_eq!(decoded.skipped_records, 1);
    assert_eq!(decoded.skipped_bytes, (starts[2] - starts[1]) as u64);

    // A zeroed block over the second and third records' starts: the
    // zeros look like the end of the records, but valid ones follow.
    let (mut segment, starts) = segment_of(5);
    segment[starts[1]..starts[2] + 10].fill(0);
    let decoded = decode_all(&segment);
    assert_eq!(ids(&decoded.records), ["p1", "p4", "p5"]);
    assert_eq!((decoded.skipped_records, decoded.torn), (2, false));

    // A bad length in the first record.
    let (mut segment, starts) = segment_of(3);
    segment[starts[0] + 1] ^= 0x01;
    let decoded = decode_all(&segment);
    assert_eq!(ids(&decoded.records), ["p2", "p3"]);
    assert!(decoded.skipped_bytes > 0);
}

#[test]
fn a_flipped_bit_in_the_last_record_is_a_torn_tail() {
    let (mut segment, starts) = segment_of(2);
    segment[starts[1] + 20] ^= 0x40;
    let decoded = decode_all(&segment);
    assert_eq!(ids(&decoded.records), ["p1"]);
    assert!(decoded.torn);
    assert_eq!(decoded.skipped_bytes, 0);
}

/// A database with the dedupe table the journal reads.
fn dedupe_db(dir: &Path) -> PathBuf {
    let database = dir.join("relay.db");
    Connection::open(&database)
        .unwrap()
        .execute_batch(
            "CREATE TABLE dedupe (key TEXT PRIMARY KEY, event_id TEXT NOT NULL, accepted_at INTEGER NOT NULL)",
        )
        .unwrap();
    database
}

fn open_intake(database: &Path, moved_through: u64) -> (Intake, Vec<Journaled>, u64) {
    let dedupe = Connection::open(database).unwrap();
    match Intake::open(database, SyncMode::Normal, 60_000, moved_through, dedupe) {
        Ok(opened) => opened,
        Err(err) => panic!("open: {err}"),
    }
}

fn appended(intake: &Intake, postback: &NewPostback) -> u64 {
    match intake.append(postback) {
        Ok(Appended::New(seq)) => seq,
        other => panic!("append {}: {other:?}", postback.id),
    }
}

#[test]
fn recovery_keeps_the_records_after_damage_and_sets_the_segment_aside() {
    let dir = tempfile::tempdir().unwrap();
    let database = dedupe_db(dir.path());
    let (intake, records, _) = open_intake(&database, 0);
    assert!(records.is_empty());
    for n in 1..=5 {
        assert_eq!(appended(&intake, &postback(&format!("p{n}"), None, &[])), n);
    }
    drop(intake); // a crash: the segment stays
    let journal = journal_dir(&database);
    let (segment, path) = segments(&journal).unwrap().remove(0);
    let mut bytes = std::fs::read(&path).unwrap();
    let mut buffer = Vec::new();
    encode(1, &postback("p1", None, &[]), &mut buffer);
    bytes[buffer.len() + 30] ^= 0x08; // inside the second record
    std::fs::write(&path, &bytes).unwrap();

    let (intake, records, last) = open_intake(&database, 0);
    assert_eq!(ids(&records), ["p1", "p3", "p4", "p5"]);
    assert_eq!(last, 5);
    // The records are moved into SQLite, then the segment goes: aside.
    intake.forget_through(last);
    assert!(!path.exists(), "no longer read as a segment");
    let aside: Vec<String> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].starts_with(&format!("{segment:020}.log.damaged-")));
    assert_eq!(intake.damaged_segments(), 1);
    // No sequence number is used twice.
    assert_eq!(appended(&intake, &postback("p6", None, &[])), 6);
    drop(intake);

    // The next start recovers only the new record, and still counts the
    // segment kept aside.
    let (intake, records, last) = open_intake(&database, 5);
    assert_eq!((ids(&records), last), (vec!["p6"], 6));
    assert_eq!(intake.damaged_segments(), 1);
}

#[test]
fn records_missing_at_the_end_of_a_segment_are_damage_when_later_ones_follow() {
    let dir = tempfile::tempdir().unwrap();
    let database = dedupe_db(dir.path());
    let (mut intake, _, _) = open_intake(&database, 0);
    intake.segment_bytes = 1024;
    let mut record = postback("p", None, &[]);
    record.raw_body = Bytes::from(vec![b'x'; 400]);
    for n in 1..=4 {
        record.id = format!("p{n}");
        record.dedupe_key = record.id.clone();
        appended(&intake, &record);
    }
    drop(intake);
    let journal = journal_dir(&database);
    let found = segments(&journal).unwrap();
    assert_eq!(found.len(), 2, "two records a segment");
    // The first segment's second record is zeroed out: it reads as a
    // clean end, but the next segment starts at 3.
    let mut bytes = std::fs::read(&found[0].1).unwrap();
    let mut buffer = Vec::new();
    encode(1, &record, &mut buffer);
    bytes[buffer.len()..].fill(0);
    std::fs::write(&found[0].1, &bytes).unwrap();

    let (intake, records, last) = open_intake(&database, 0);
    assert_eq!((ids(&records), last), (vec!["p1", "p3", "p4"], 4));
    intake.forget_through(last);
    assert!(!found[0].1.exists() && !found[1].1.exists());
    assert_eq!(intake.damaged_segments(), 1, "the first one, kept aside");
    drop(intake);

    // Records already moved into SQLite are not missing: a torn tail
    // before a segment that starts after them is no damage.
    let dir = tempfile::tempdir().unwrap();
    let database = dedupe_db(dir.path());
    let (mut intake, _, _) = open_intake(&database, 0);
    intake.segment_bytes = 1024;
    for n in 1..=4 {
        record.id = format!("p{n}");
        record.dedupe_key = record.id.clone();
        appended(&intake, &record);
    }
    drop(intake);
    let found = segments(&journal_dir(&database)).unwrap();
    std::fs::write(&found[0].1, &bytes).unwrap();
    let (intake, records, _) = open_intake(&database, 2);
    assert_eq!(ids(&records), ["p3", "p4"]);
    intake.forget_through(4);
    assert_eq!(intake.damaged_segments(), 0);
}

#[test]
fn a_torn_tail_is_dropped_and_its_segment_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let database = dedupe_db(dir.path());
    let (intake, _, _) = open_intake(&database, 0);
    for n in 1..=3 {
        appended(&intake, &postback(&format!("p{n}"), None, &[]));
    }
    drop(intake);
    let (_, path) = segments(&journal_dir(&database)).unwrap().remove(0);
    let mut bytes = std::fs::read(&path).unwrap();
    let end = bytes.iter().rposition(|byte| *byte != 0).unwrap();
    bytes[end - 5] ^= 0x10; // inside the last record
    std::fs::write(&path, &bytes).unwrap();

    let (intake, records, last) = open_intake(&database, 0);
    assert_eq!((ids(&records), last), (vec!["p1", "p2"], 2));
    intake.forget_through(last);
    assert!(!path.exists());
    assert_eq!(intake.damaged_segments(), 0);
    let left: Vec<_> = std::fs::read_dir(journal_dir(&database))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the new segment: {left:?}");
}

#[test]
fn rotations_never_collide_with_the_spare_being_written_out() {
    let dir = tempfile::tempdir().unwrap();
    let database = dedupe_db(dir.path());
    let (mut intake, _, _) = open_intake(&database, 0);
    // Small segments: a rotation every few records.
    intake.segment_bytes = 64 * 1024;
    let intake = Arc::new(intake);
    let done = Arc::new(AtomicBool::new(false));
    let spare = {
        let (intake, done) = (intake.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                intake.prepare_spare();
            }
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let intake = intake.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for n in 0..150 {
                    let mut record = postback(&format!("w{writer}-{n}"), None, &[]);
                    record.raw_body = Bytes::from(vec![b'x'; 20 * 1024]);
                    if let Err(err) = intake.append(&record) {
                        failures.push(err.to_string());
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = writers
        .into_iter()
        .flat_map(|writer| writer.join().unwrap())
        .collect();
    done.store(true, Ordering::Relaxed);
    spare.join().unwrap();
    assert_eq!(failures, Vec::<String>::new());
    drop(intake);
    let (_, records, last) = open_intake(&database, 0);
    assert_eq!((records.len(), last), (600, 600), "every record recovered");
}
