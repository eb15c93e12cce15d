//! `shard pack --out s3://…` and `shard verify s3://…` against moto's S3 server on loopback
//! (`scripts/moto-venv.sh`; `DENSEDINO_MOTO` names its `moto_server`; run by `.ci/run`): the set lands in
//! the store shard by shard as they are finished and its index last; a pack killed half way leaves no set
//! there and `--resume` finishes it; it verifies there; a second `pack --resume` uploads nothing. Reading
//! from stores, the cache and the failures are `trainer/tests/remote.rs`.

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod util;
use util::{jpeg_rgb, ok, run_shard};

#[test]
#[ignore = "needs moto_server: DENSEDINO_MOTO=$(scripts/moto-venv.sh) ... -- --ignored (run by .ci/run)"]
fn pack_writes_a_set_into_a_bucket_that_verifies_and_resumes_without_uploads() {
    let bin = std::env::var("DENSEDINO_MOTO").expect("DENSEDINO_MOTO: the path of moto_server");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    /// The server, killed however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Killed(
        Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "moto_server did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ];
    // The bucket, by an unsigned request (moto checks no signature unless asked).
    {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "PUT /sets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..12u8 {
        let path = input.join(format!("c{}/{i}.jpg", i % 3));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, jpeg_rgb(32 + i as u16, 24, i)).unwrap();
    }
    let stage = tmp.path().join("stage");
    let url = "s3://sets/toy/train";
    let pack = |extra: &[&str]| {
        let mut args =
            vec!["pack", "--input", input.to_str().unwrap(), "--out", url, "--per-shard", "4", "--quiet"];
        args.extend(["--stage", stage.to_str().unwrap()]);
        args.extend(extra);
        ok(&run_shard(&args, &env))
    };
    // Killed after six samples: the first shard (four) is in the store, uploaded as it was finished; the
    // index is not, so the store holds no set yet.
    let mut args =
        vec!["pack", "--input", input.to_str().unwrap(), "--out", url, "--per-shard", "4", "--quiet"];
    args.extend(["--stage", stage.to_str().unwrap()]);
    let crashed = run_shard(&args, &[&env[..], &[(shard::pack::CRASH_ENV, "6")]].concat());
    assert!(!crashed.status.success());
    let not_yet = run_shard(&["verify", url], &env);
    let err = String::from_utf8_lossy(&not_yet.stderr);
    assert!(
        !not_yet.status.success() && err.contains("index.json") && err.contains("no such object"),
        "{err}"
    );
    // Resumed: the rest packed and uploaded, the index last.
    let first = pack(&["--resume"]);
    assert!(first.contains("3 shards were there") && first.contains("0 uploaded now"), "{first}");
    assert!(first.contains("index: s3://sets/toy/train/index.json"), "{first}");
    let verified = ok(&run_shard(&["verify", url, "--decode"], &env));
    assert!(verified.contains("ok: 3 shards, 12 samples, 12 images decoded"), "{verified}");
    // The store's address and key from the AWS CLI's files alone (no AWS_* variable): the profile named
    // by AWS_PROFILE, its region and endpoint in `config`, its key in `credentials`.
    let config = tmp.path().join("aws-config");
    let credentials = tmp.path().join("aws-credentials");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = eu-west-1\n[profile lab]\nregion = us-east-1\nendpoint_url = {endpoint}\n"
        ),
    )
    .unwrap();
    std::fs::write(&credentials, "[lab]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
        .unwrap();
    let files = [
        ("AWS_PROFILE", "lab"),
        ("AWS_CONFIG_FILE", config.to_str().unwrap()),
        ("AWS_SHARED_CREDENTIALS_FILE", credentials.to_str().unwrap()),
    ];
    let mut cmd = Command::new(util::shard_bin());
    cmd.args(["verify", url]).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    let by_files = cmd.envs(files).output().unwrap();
    assert!(String::from_utf8_lossy(&by_files.stdout).contains("ok: 3 shards"), "{by_files:?}");
    assert!(shard::Index::load(&stage).unwrap().shards.len() == 3, "the staged set stays for --resume");
    // Again: the staged set is complete and the store holds it; nothing is packed or uploaded.
    let again = pack(&["--resume"]);
    assert!(again.contains("is complete") && again.contains("0 uploaded now"), "{again}");

    // Where a set cannot go, refused by name.
    let refused = run_shard(&["pack", "--input", input.to_str().unwrap(), "--out", "https://host/set"], &env);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("not to HTTP or a pipe"), "{err}");
    let out = tmp.path().join("local");
    let args = ["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--stage", "x"];
    let refused = run_shard(&args, &env);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("--stage is for a store URL"), "{err}");
}
