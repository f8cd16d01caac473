"""The remote tier over TLS with authentication, against private redis-server processes
started here: ``rediss://`` with a self-signed CA made by the test, a password and ACL
users in the URL (an ACL that confines a user to its scopes), client certificates, and
``rediss+cluster://`` for a TLS Redis Cluster. Every failure (untrusted server, wrong
password, a command the ACL denies) is a counted miss, never an exception."""

from __future__ import annotations

import secrets
import time

import pytest
import torch

from cacheblend_ext import PUBLIC_SCOPE
from cacheblend_ext.blend.engine import BlendConfig, BlendEngine
from cacheblend_ext.cached import CachedBlender
from cacheblend_ext.store import FORMAT_VERSION, ChunkStore
from cacheblend_ext.store.pipeline import open_layer_source
from cacheblend_ext.testing.redis_server import RedisServer, RedisTestCluster
from helpers import request_parts, tiny_llama

L, T, H, D = 6, 9, 2, 8
MAC_KEY = bytes(range(100, 132))
ALICE = "alice"


def make_kv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, T, H, D, generator=g) + 0.5


# The commands a serving process needs (docs/security.md): reads, SET, the
# compare-and-delete script, and what the cluster client asks at start. No SCAN or KEYS,
# which would list other scopes' keys.
SERVING_COMMANDS = ("-@all +get +getrange +strlen +set +exists +del +eval +ping +command +cluster|slots "
                    "+cluster|shards")


class Accounts:
    """Passwords made for this run: the default (admin) user, ``alice`` (her own scope,
    read-only ``public``) and ``indexer`` (writes ``public``)."""

    def __init__(self):
        self.admin, self.alice, self.indexer = (secrets.token_urlsafe(12) for _ in range(3))
        ns = f"cacheblend:v{FORMAT_VERSION}"
        self.users = (f"{ALICE} on >{self.alice} ~{ns}:{ALICE}:* %R~{ns}:{PUBLIC_SCOPE}:* {SERVING_COMMANDS}",
                      f"indexer on >{self.indexer} ~{ns}:{PUBLIC_SCOPE}:* {SERVING_COMMANDS}")


@pytest.fixture(scope="module")
def accounts():
    return Accounts()


@pytest.fixture(scope="module")
def tls_server(tls_files, accounts, tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("tls-redis"), tls=tls_files, password=accounts.admin,
                     users=accounts.users) as server:
        yield server


@pytest.fixture
def tls(tls_server):
    tls_server.client().flushall()
    return tls_server


def store_at(url, options=None, **kw):
    kw.setdefault("cpu_bytes", 0)
    kw.setdefault("remote_timeout_s", 2.0)
    return ChunkStore("m", "r", remote=url, remote_options=options, **kw)


def test_rediss_with_acl_user_round_trip_and_stream(tls, accounts):
    store = store_at(tls.url_for(ALICE, accounts.alice), tls.client_options, mac_key=MAC_KEY)
    kvs = [make_kv(i) for i in range(3)]
    keys = [store.put(f"c{i}", kv, torch.arange(T), scope=ALICE) for i, kv in enumerate(kvs)]
    assert torch.equal(store.get(keys[1], scope=ALICE).kv, kvs[1])
    for pipelined in (True, False):  # the layer stream reads replies straight from the TLS socket
        source, missing = open_layer_source(store, keys, "cpu", scope=ALICE, pipelined=pipelined)
        assert not missing
        layers = [[t.clone() for t in source.layer(l)] for l in range(L)]
        source.close()
        got = [torch.stack([layers[l][i] for l in range(L)]) for i in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(got, kvs))
    st = store.stats()
    assert st["remote"]["errors"] == 0 and st["remote"]["writes"] == 3 and st["bad_mac"] == 0
    # the CA in the URL's query works as well, and the default user with its password
    query = f"?ssl_ca_certs={tls.tls.ca}"
    admin = store_at(tls.url_for(None, accounts.admin) + query)
    assert torch.equal(admin.get(keys[0], scope=ALICE).kv, kvs[0])


def test_untrusted_server_wrong_password_and_unknown_user_are_counted_misses(tls, accounts):
    key = store_at(tls.url_for(ALICE, accounts.alice), tls.client_options).put("k", make_kv(), torch.arange(T),
                                                                              scope=ALICE)
    cases = {"no CA": (tls.url_for(ALICE, accounts.alice), None),
             "plain text to a TLS port": (tls.url_for(ALICE, accounts.alice).replace("rediss", "redis"), None),
             "wrong password": (tls.url_for(ALICE, "wrong-" + accounts.alice), tls.client_options),
             "unknown user": (tls.url_for("mallory", accounts.alice), tls.client_options),
             "no password": (tls.url_for(), tls.client_options)}
    for name, (url, options) in cases.items():
        store = store_at(url, options, remote_timeout_s=1.0)
        t0 = time.monotonic()
        assert store.get(key, scope=ALICE) is None, name
        store.put("other", make_kv(), torch.arange(T), scope=ALICE)
        st = store.stats()
        assert st["remote"]["errors"] + st["remote"]["timeouts"] >= 1, (name, st["remote"])
        assert st["write_errors"] + st["remote"]["skipped_down"] >= 1, (name, st)
        assert time.monotonic() - t0 < 5, name
    assert tls.client().exists(f"cacheblend:v{FORMAT_VERSION}:{ALICE}:m:r:other") == 0


def test_acl_confines_a_user_to_its_scopes(tls, accounts):
    indexer = store_at(tls.url_for("indexer", accounts.indexer), tls.client_options)
    public = indexer.put("shared", make_kv(1), torch.arange(T), scope=PUBLIC_SCOPE)
    admin = store_at(tls.url_for(None, accounts.admin), tls.client_options)
    bob = admin.put("bobs-doc", make_kv(2), torch.arange(T), scope="bob")
    alice = store_at(tls.url_for(ALICE, accounts.alice), tls.client_options)
    mine = alice.put("mine", make_kv(3), torch.arange(T), scope=ALICE)
    assert torch.equal(alice.get(public, scope=PUBLIC_SCOPE).kv, make_kv(1))  # read-only access to public
    alice.put("planted", make_kv(4), torch.arange(T), scope=PUBLIC_SCOPE)  # refused by the ACL
    assert alice.stats()["write_errors"] == 1 and admin.get("planted", scope=PUBLIC_SCOPE) is None
    assert alice.get(bob, scope="bob") is None  # no access to bob's scope at all
    # one batch that mixes a denied scope with her own: her chunks still load
    handles = alice.open_many([bob, mine, public], scope=["bob", ALICE, PUBLIC_SCOPE])
    assert handles[0] is None and handles[1] is not None and handles[2] is not None
    for h in handles[1:]:
        h.close()
    assert alice.stats()["remote"]["errors"] >= 2 and not alice.stats()["remote"]["down"]
    assert alice.keys("remote", scope="bob") == []  # no SCAN: she cannot list bob's chunk keys either
    assert admin.keys("remote", scope="bob") == [bob]
    # a bad value in her own scope is deleted by her store (the compare-and-delete script)
    tls.client().setrange(f"cacheblend:v{FORMAT_VERSION}:{ALICE}:m:r:{mine}", 8, (1).to_bytes(4, "little"))
    assert alice.get(mine, scope=ALICE) is None and alice.stats()["corrupt"] == 1
    assert tls.client().exists(f"cacheblend:v{FORMAT_VERSION}:{ALICE}:m:r:{mine}") == 0


def test_client_certificates(tls_files, tmp_path):
    with RedisServer(tmp_path / "mtls", tls=tls_files, tls_client_auth=True) as server:
        without = store_at(server.url, tls_files.client_options(client_certificate=False))
        key = without.put("k", make_kv(), torch.arange(T), scope="t")
        assert without.stats()["write_errors"] == 1 and without.get(key, scope="t") is None
        with_cert = store_at(server.url, tls_files.client_options(client_certificate=True))
        with_cert.put("k", make_kv(), torch.arange(T), scope="t")
        assert torch.equal(with_cert.get(key, scope="t").kv, make_kv())


def test_passwords_stay_out_of_error_messages():
    with pytest.raises(ValueError, match="remote URL must start with") as err:
        ChunkStore(remote="http://alice:hunter2-secret@127.0.0.1:6379/0")
    assert "hunter2-secret" not in str(err.value) and "alice:***@" in str(err.value)


@pytest.fixture(scope="module")
def tls_cluster(tls_files, accounts, tmp_path_factory):
    with RedisTestCluster(tmp_path_factory.mktemp("tls-cluster"), tls=tls_files, password=accounts.admin,
                          users=accounts.users) as cluster:
        yield cluster


def test_rediss_cluster_with_acl_user_serves_blends(tls_cluster, accounts):
    engine = BlendEngine(tiny_llama())
    cfg = BlendConfig(recompute_ratio=0.3)
    prefix, chunks, query = request_parts(9)
    context = engine.chunk_context(prefix, cfg)
    ref = engine.blend([prefix] + [engine.encode_chunk(c, context) for c in chunks] + [query], cfg)
    url = tls_cluster.url_for(ALICE, accounts.alice)
    assert url.startswith("rediss+cluster://")

    def blender():
        store = ChunkStore(engine.identity.model_id, engine.identity.rope_id, cpu_bytes=0, remote=url,
                           remote_options=tls_cluster.client_options, mac_key=MAC_KEY)
        return CachedBlender(engine, store)

    writer = blender()
    writer.add_many(chunks, prefix, cfg, scope=ALICE)
    assert sum(n.client().dbsize() for n in tls_cluster.nodes) == len(chunks)
    result, report = blender().blend(prefix, chunks, query, cfg, scope=ALICE)  # a fresh store: remote only
    assert report.tiers == {"remote": 3} and torch.equal(result.logits, ref.logits)
    # the ACL holds on every node: alice cannot plant values in the public scope
    writer.store.put("planted", make_kv(), torch.arange(T), scope=PUBLIC_SCOPE)
    st = writer.store.stats()
    assert st["write_errors"] == 1 and st["bad_mac"] == 0 and st["remote"]["timeouts"] == 0
    writer.store.clear(("remote",), scope=ALICE)  # needs SCAN, which a serving user lacks
    assert sum(n.client().dbsize() for n in tls_cluster.nodes) == len(chunks)
    admin = ChunkStore(engine.identity.model_id, engine.identity.rope_id,
                       remote=tls_cluster.url_for(None, accounts.admin), remote_options=tls_cluster.client_options)
    admin.clear(("remote",), scope=ALICE)
    assert sum(n.client().dbsize() for n in tls_cluster.nodes) == 0
