//! A 1 GiB object through multipart upload against moto on 127.0.0.1, with memory
//! bounded by `part_size × concurrency`: the peak RSS of this process stays far below
//! the object's size, and the object reads back with the same SHA-256.
//! About a minute and 1 GiB of temporary disk; `-- --nocapture` prints the figures.

#[path = "common/moto.rs"]
mod moto;

use std::io::Write;
use std::time::Instant;

use dreambooth_trainer::storage::{AccessKeys, S3Storage, Storage, StorageSettings};
use moto::MotoServer;
use sha2::{Digest, Sha256};

const SIZE: u64 = 1 << 30;

/// Peak resident memory of this process so far (`VmHWM`), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024
}

#[test]
fn a_1_gib_file_uploads_in_parts_with_bounded_memory() {
    let server = MotoServer::start();
    server.create_bucket("large");
    let settings = StorageSettings {
        endpoint: Some(server.endpoint()),
        region: Some(moto::REGION.into()),
        force_path_style: true,
        access_keys: Some(AccessKeys {
            access_key_id: moto::ACCESS_KEY_ID.into(),
            secret_access_key: moto::SECRET_ACCESS_KEY.into(),
        }),
        ..StorageSettings::default()
    };
    let tuning = settings.tuning.clone();
    let storage = S3Storage::open("s3://large/models", &settings).unwrap();

    // Written in 8 MiB chunks so making the file does not raise the peak itself.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("big.safetensors");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&local).unwrap());
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; 8 << 20];
    for index in 0..(SIZE / chunk.len() as u64) {
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = (index as usize * 31 + i * 7 + (i >> 12)) as u8;
        }
        hash.update(&chunk);
        file.write_all(&chunk).unwrap();
    }
    file.flush().unwrap();
    drop(file);
    let expected = hex::encode(hash.finalize());
    let before = peak_rss_mib();

    let started = Instant::now();
    let put = storage.put_file(&local, "big.safetensors").unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let peak = peak_rss_mib();
    let mb_per_s = SIZE as f64 / 1e6 / seconds;
    println!(
        "1 GiB multipart upload: {seconds:.1} s, {mb_per_s:.0} MB/s; peak RSS {peak} MiB \
         (before {before} MiB); parts of {} MiB, {} in flight",
        tuning.part_size >> 20,
        tuning.concurrency
    );
    assert_eq!(put.bytes, SIZE);
    assert_eq!(put.sha256, expected);
    let head = storage.head("big.safetensors").unwrap().unwrap();
    assert_eq!(head.size, SIZE);
    assert_eq!(head.sha256.as_deref(), Some(expected.as_str()));
    let bound = before + 4 * (tuning.part_size >> 20) * tuning.concurrency as u64 + 128;
    assert!(peak < bound, "peak RSS {peak} MiB over {bound} MiB");

    let copy = dir.path().join("copy");
    let started = Instant::now();
    let got = storage.get_to_file("big.safetensors", &copy).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "1 GiB download: {seconds:.1} s, {:.0} MB/s; peak RSS {} MiB",
        SIZE as f64 / 1e6 / seconds,
        peak_rss_mib()
    );
    assert_eq!(got.sha256, expected);
    assert!(peak_rss_mib() < bound);
}
