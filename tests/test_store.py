"""The artifact store contract, run against a local directory and against S3 (a real moto server on loopback),
and the stage artifact layout built on it."""

import itertools
import json
import threading
import time

import boto3
import pytest

from selflengthen.pipeline.artifacts import MANIFEST, SUCCESS, StageArtifacts, iteration_prefix, part_name
from selflengthen.pipeline.store import (
    AlreadyExists,
    LocalStore,
    S3Store,
    dumps_jsonl,
    open_store,
    read_json,
    read_jsonl,
    write_json,
)

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def s3(s3_endpoint, aws_env):
    """A fresh bucket on the moto server, and a boto3 client to look at it directly."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"test-bucket-{next(_buckets)}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture(params=["local", "s3", "s3-root"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    client, bucket = request.getfixturevalue("s3")
    endpoint = request.getfixturevalue("s3_endpoint")
    prefix = "some/prefix" if request.param == "s3" else ""
    return S3Store(bucket, prefix, endpoint_url=endpoint)


# -- the store contract (every backend) ------------------------------------------------------------------------------


def test_write_then_read(store):
    store.write("a/b/c.bin", b"\x00\x01binary\xff")
    store.write("empty", b"")
    assert store.read("a/b/c.bin") == b"\x00\x01binary\xff"
    assert store.read("empty") == b""


def test_write_replaces(store):
    store.write("k.txt", b"first")
    store.write("k.txt", b"second, longer")
    assert store.read("k.txt") == b"second, longer"
    store.write("k.txt", b"3")
    assert store.read("k.txt") == b"3"


def test_exists(store):
    assert not store.exists("x/y.json")
    store.write("x/y.json", b"{}")
    assert store.exists("x/y.json")
    assert not store.exists("x")  # a "directory" is not a key
    assert not store.exists("x/y")  # nor is a prefix of a name


def test_missing_key_raises_key_error(store):
    with pytest.raises(KeyError):
        store.read("no/such/key")
    store.write("dir/file", b"1")
    with pytest.raises(KeyError):
        store.read("dir")  # names a "directory"
    with pytest.raises(KeyError):
        store.read("dir/file/below")  # runs through a file


def test_list_prefix_semantics_and_order(store):
    for key in ["b", "a/2/x", "ab/3", "a/1", "a/10", "a/2/w", "abc"]:
        store.write(key, key.encode())
    assert store.list("a") == ["a/1", "a/10", "a/2/w", "a/2/x"]  # whole segments: not ab/, not abc
    assert store.list("a/") == store.list("a")
    assert store.list("a/2") == ["a/2/w", "a/2/x"]
    assert store.list("ab") == ["ab/3"]
    assert store.list("") == ["a/1", "a/10", "a/2/w", "a/2/x", "ab/3", "abc", "b"]
    assert store.list("nothing") == []
    assert store.list("b") == []  # a key, not a prefix of keys


def test_list_shows_dot_named_keys(store):
    store.write("d/.keep", b"")
    store.write("d/x", b"1")
    assert store.list("d") == ["d/.keep", "d/x"]


def test_delete(store):
    store.write("d/one", b"1")
    store.write("d/two", b"2")
    store.delete("d/one")
    assert not store.exists("d/one")
    assert store.list("d") == ["d/two"]
    with pytest.raises(KeyError):
        store.read("d/one")
    store.delete("d/one")  # deleting a missing key is a no-op
    store.delete("never/there")
    store.delete("d")  # a "directory" is no key: nothing happens
    assert store.read("d/two") == b"2"


def test_if_absent_lets_one_writer_win(store):
    store.write("marker", b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.write("marker", b"second", if_absent=True)
    assert store.read("marker") == b"first"
    store.write("marker", b"forced")  # an unconditional write still replaces
    assert store.read("marker") == b"forced"
    store.delete("marker")
    store.write("marker", b"again", if_absent=True)  # absent again: succeeds
    assert store.read("marker") == b"again"


BAD_KEYS = ["../escape", "a/../../escape", "/etc/passwd", "a//b", "", ".", "a/./b", "a/", "..", "a/.."]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_escaping_keys_are_refused(store, key):
    with pytest.raises(ValueError, match="invalid store key"):
        store.write(key, b"x")
    with pytest.raises(ValueError, match="invalid store key"):
        store.read(key)
    with pytest.raises(ValueError, match="invalid store key"):
        store.exists(key)
    with pytest.raises(ValueError, match="invalid store key"):
        store.delete(key)


@pytest.mark.parametrize("prefix", ["../", "..", "/abs", "a/../.."])
def test_escaping_list_prefixes_are_refused(store, prefix):
    with pytest.raises(ValueError, match="invalid store key"):
        store.list(prefix)


def test_json_and_jsonl_helpers(store):
    rows = [{"id": 1, "text": "héllo 世界"}, {"id": 2, "nested": {"a": [1, 2]}}, {}]
    store.write("rows.jsonl", dumps_jsonl(rows))
    assert list(read_jsonl(store, "rows.jsonl")) == rows
    assert "世界".encode() in store.read("rows.jsonl")  # UTF-8, not \u escapes
    store.write("gaps.jsonl", b'{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(read_jsonl(store, "gaps.jsonl")) == [{"a": 1}, {"a": 2}]
    assert dumps_jsonl([]) == b""
    write_json(store, "doc.json", {"k": "v", "n": [1]})
    assert read_json(store, "doc.json") == {"k": "v", "n": [1]}
    with pytest.raises(AlreadyExists):
        write_json(store, "doc.json", {"other": True}, if_absent=True)
    assert read_json(store, "doc.json") == {"k": "v", "n": [1]}


# -- backend specifics -----------------------------------------------------------------------------------------------


def test_local_store_stays_under_its_root(tmp_path):
    root = tmp_path / "root"
    store = LocalStore(root)
    for key in ["../outside", "/" + str(tmp_path / "abs")]:
        with pytest.raises(ValueError):
            store.write(key, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the root was made
    store.write("a/b", b"1")
    assert store.local_path("a/b") == root.resolve() / "a" / "b"
    assert store.local_path("a/b").read_bytes() == b"1"
    assert store.uri == f"file://{root.resolve()}"


def test_local_store_leaves_no_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    store.write("d/k", b"1")
    store.write("d/k", b"2")
    with pytest.raises(AlreadyExists):
        store.write("d/k", b"3", if_absent=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["k"]
    assert store.read("d/k") == b"2"


def test_local_store_hides_in_flight_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    store.write("d/k", b"1")
    (tmp_path / "d" / ".k.abc123.tmp").write_bytes(b"half")  # what a killed writer leaves behind
    assert store.list("d") == ["d/k"]


def test_local_if_absent_race_has_one_winner(tmp_path):
    store = LocalStore(tmp_path)
    barrier = threading.Barrier(8)
    results = []

    def writer(i):
        barrier.wait()
        try:
            store.write("shard", f"writer {i}".encode(), if_absent=True)
            results.append(i)
        except AlreadyExists:
            pass

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1
    assert store.read("shard") == f"writer {results[0]}".encode()


def test_s3_store_keeps_keys_under_its_prefix(s3, s3_endpoint):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="outside", Body=b"o")
    client.put_object(Bucket=bucket, Key="prefixed/x", Body=b"o")  # shares characters, not the segment
    store = S3Store(bucket, "/pre/", endpoint_url=s3_endpoint)
    assert store.uri == f"s3://{bucket}/pre"
    store.write("a/b.json", b"{}")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["outside", "pre/a/b.json", "prefixed/x"]
    assert store.list("") == ["a/b.json"]
    assert store.local_path("a/b.json") is None
    with pytest.raises(KeyError):
        store.read("outside")


def test_s3_if_absent_uses_a_conditional_put(s3, s3_endpoint):
    client, bucket = s3
    store = S3Store(bucket, "p", endpoint_url=s3_endpoint)
    sent = []
    client_events = store.client.meta.events
    client_events.register("before-call.s3.PutObject", lambda params, **kw: sent.append(dict(params["headers"])))
    store.write("k", b"1", if_absent=True)
    store.write("k", b"2")
    assert sent[0].get("If-None-Match") == "*"
    assert "If-None-Match" not in sent[1]
    # the conditional write is refused by the server itself, even for an object another client wrote
    client.put_object(Bucket=bucket, Key="p/other", Body=b"theirs")
    with pytest.raises(AlreadyExists):
        store.write("other", b"mine", if_absent=True)
    assert store.read("other") == b"theirs"


def test_s3_errors_other_than_a_lost_race_propagate(s3_endpoint, aws_env):
    from botocore.exceptions import ClientError

    store = S3Store("no-such-bucket-here", endpoint_url=s3_endpoint)
    with pytest.raises(ClientError):
        store.write("k", b"1", if_absent=True)


# -- open_store ------------------------------------------------------------------------------------------------------


def test_open_store_file_uri(tmp_path, monkeypatch):
    store = open_store(f"file://{tmp_path}/runs")
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "runs").resolve()
    monkeypatch.chdir(tmp_path)
    relative = open_store("file://./rel/dir")
    assert isinstance(relative, LocalStore) and relative.root == (tmp_path / "rel" / "dir").resolve()
    relative.write("k", b"1")
    assert (tmp_path / "rel" / "dir" / "k").read_bytes() == b"1"


@pytest.mark.parametrize(
    "uri, bucket, prefix",
    [
        ("s3://my-bucket/runs/a", "my-bucket", "runs/a"),
        ("s3://my-bucket/runs/", "my-bucket", "runs"),
        ("s3://my-bucket", "my-bucket", ""),
    ],
)
def test_open_store_s3_uri(uri, bucket, prefix, aws_env):
    store = open_store(uri, endpoint_url="http://127.0.0.1:1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == (bucket, prefix)
    assert store.client.meta.endpoint_url == "http://127.0.0.1:1"
    assert store.uri == uri.rstrip("/")


def test_open_store_s3_talks_to_the_endpoint(s3, s3_endpoint):
    client, bucket = s3
    store = open_store(f"s3://{bucket}/runs", endpoint_url=s3_endpoint)
    store.write("x/y", b"hello")
    assert client.get_object(Bucket=bucket, Key="runs/x/y")["Body"].read() == b"hello"


@pytest.mark.parametrize("uri", ["http://host/x", "/plain/path", "gs://bucket/x", "S3://bucket"])
def test_open_store_refuses_other_schemes(uri):
    with pytest.raises(ValueError, match="file://DIR or s3://BUCKET/PREFIX"):
        open_store(uri)


# -- stage artifacts -------------------------------------------------------------------------------------------------


def test_layout_and_iteration_prefix(store):
    art = StageArtifacts(store, "my-run", 3, "respond")
    assert art.prefix == "my-run/iter-03/respond"
    assert art.key(MANIFEST) == "my-run/iter-03/respond/manifest.json"
    assert art.work_key(7) == "my-run/iter-03/respond/work/part-00007.jsonl"
    assert art.uri == f"{store.uri}/my-run/iter-03/respond"
    assert part_name(123456) == "part-123456.jsonl"
    assert iteration_prefix("r", 12) == "r/iter-12"
    with pytest.raises(ValueError):
        iteration_prefix("r", 0)


def test_work_shards_are_written_once(store):
    art = StageArtifacts(store, "run", 1, "respond")
    assert art.work_done() == set()
    assert art.write_work(2, [{"id": "c"}]) is True
    assert art.write_work(0, [{"id": "a"}, {"id": "b"}]) is True
    assert art.write_work(0, [{"id": "late writer"}]) is False  # the first copy stands
    assert art.work_done() == {0, 2}
    assert art.read_work(0) == [{"id": "a"}, {"id": "b"}]
    assert [r["id"] for r in art.iter_work()] == ["a", "b", "c"]  # shard order, not write order
    assert art.write_work(1, []) is True  # an empty shard is still a finished shard
    assert art.work_done() == {0, 1, 2}
    assert art.read_work(1) == []


def test_done_only_after_finish(store):
    art = StageArtifacts(store, "run", 1, "extend")
    art.write_work(0, [{"id": 1}])
    art.write_outputs([{"id": 1}], shard_size=10)
    assert not art.done()
    before = time.time()
    manifest = art.finish({"counts": {"accepted": 1, "requested": 2}, "durationSeconds": 1.5})
    assert art.done()
    assert store.exists(art.key(SUCCESS)) and store.read(art.key(SUCCESS)) == b""
    assert manifest["stage"] == "extend" and manifest["iteration"] == 1
    assert before <= manifest["finishedAt"] <= time.time()
    assert manifest["counts"] == {"accepted": 1, "requested": 2} and manifest["durationSeconds"] == 1.5
    assert art.manifest() == manifest
    assert json.loads(store.read(art.key(MANIFEST))) == manifest
    other = StageArtifacts(store, "run", 2, "extend")
    assert not other.done()  # another iteration is another stage


def test_outputs_are_sharded_and_rewritten_without_stale_shards(store):
    art = StageArtifacts(store, "run", 1, "respond")
    art.write_work(0, [{"w": 0}])
    rows = [{"i": i} for i in range(10)]
    assert art.write_outputs(iter(rows), shard_size=4) == 10  # any iterable, streamed
    keys = art.output_keys()
    assert keys == [art.key(part_name(i)) for i in range(3)]
    assert [len(list(read_jsonl(store, k))) for k in keys] == [4, 4, 2]
    assert list(art.read_outputs()) == rows

    assert art.write_outputs([{"i": "new"}] * 3, shard_size=4) == 3
    assert art.output_keys() == [art.key(part_name(0))]
    assert list(art.read_outputs()) == [{"i": "new"}] * 3
    assert art.work_done() == {0} and art.read_work(0) == [{"w": 0}]  # work shards untouched

    assert art.write_outputs([], shard_size=4) == 0
    assert art.output_keys() == [] and list(art.read_outputs()) == []


def test_outputs_exact_multiple_of_shard_size(store):
    art = StageArtifacts(store, "run", 1, "respond")
    assert art.write_outputs(({"i": i} for i in range(6)), shard_size=3) == 6
    assert art.output_keys() == [art.key(part_name(0)), art.key(part_name(1))]
    assert art.write_outputs(({"i": i} for i in range(5)), shard_size=1) == 5
    assert len(art.output_keys()) == 5


def test_stages_do_not_see_each_others_outputs(store):
    respond = StageArtifacts(store, "run", 1, "respond")
    extend = StageArtifacts(store, "run", 1, "extend")
    other_run = StageArtifacts(store, "run-2", 1, "respond")
    respond.write_outputs([{"s": "respond"}], shard_size=8)
    extend.write_outputs([{"s": "extend"}], shard_size=8)
    other_run.write_outputs([{"s": "other"}], shard_size=8)
    extend.write_outputs([{"s": "extend again"}], shard_size=8)
    assert list(respond.read_outputs()) == [{"s": "respond"}]
    assert list(extend.read_outputs()) == [{"s": "extend again"}]
    assert list(other_run.read_outputs()) == [{"s": "other"}]


def test_nested_stage_outputs_belong_to_the_nested_stage(tmp_path):
    store = LocalStore(tmp_path)  # the same on S3: the listing is the backends' shared contract
    child = StageArtifacts(store, "run", 1, "build-sft/generator")
    parent = StageArtifacts(store, "run", 1, "build-sft")
    child.write_outputs([{"prompt": "p", "response": "r"}], shard_size=8)
    assert parent.output_keys() == []
    parent.write_outputs([], shard_size=8)
    assert list(child.read_outputs()) == [{"prompt": "p", "response": "r"}]
