"""Bearer tokens with roles, and TLS / mTLS on the gRPC port, through real servers and channels."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nextbest.bandit.errors import InvalidInput
from nextbest.client import NextbestClient
from nextbest.rpc.auth import hash_token, load_tokens, main, parse_env, parse_file
from nextbest.rpc.tls import channel_credentials, check_settings, server_credentials
from nextbest.v1 import admin_pb2, decision_pb2
from tests import envs
from tests.harness import ADMIN_TOKEN, CHANNEL_TOKEN, LIMITED_TOKEN, TOKENS, ServerThread, make_settings, token_client


def _code(e: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return e.value.code()  # type: ignore[attr-defined, no-any-return]


client = token_client


def test_calls_without_a_valid_token_are_unauthenticated(authed: ServerThread) -> None:
    for token in (None, "", "wrong-token", hash_token(CHANNEL_TOKEN)):  # the hash itself is no token
        with client(authed.target, token) as c:
            for call in (lambda: c.choose("app_home_banner"), lambda: c.reward("e1", 1.0), lambda: c.placements()):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(authed.target) as ch:  # a scheme other than Bearer
        stub = NextbestClient(authed.target, channel=ch).decision
        with pytest.raises(grpc.RpcError) as e:
            stub.Choose(decision_pb2.ChooseRequest(placement="app_home_banner"), metadata=[("authorization", f"Basic {CHANNEL_TOKEN}")])
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
    with client(authed.target, ADMIN_TOKEN) as admin:
        assert admin.stats("app_home_banner").decisions == 0


def test_roles_decide_which_service_a_token_may_call(authed: ServerThread) -> None:
    with client(authed.target, CHANNEL_TOKEN) as chan, client(authed.target, ADMIN_TOKEN) as admin:
        d = chan.choose("app_home_banner", {"segment": "youth"})
        assert chan.reward(d.event_id, 1.0) == "learned"
        with pytest.raises(grpc.RpcError) as e:
            chan.stats("app_home_banner")
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            chan.apply([envs.placement("sneaky")])
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            admin.choose("app_home_banner")
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
        s = admin.stats("app_home_banner")
        assert s.decisions == 1 and sum(a.rewards for a in s.arms) == 1
        assert [p.id for p in admin.placements()] == ["app_home_banner", "ussd_main_menu"]


def test_a_token_limited_to_placements_is_denied_the_others_and_changes_nothing(authed: ServerThread) -> None:
    with client(authed.target, LIMITED_TOKEN) as ussd, client(authed.target, CHANNEL_TOKEN) as app:
        mine = ussd.choose("ussd_main_menu")
        assert ussd.reward(mine.event_id, 1.0) == "learned"
        with pytest.raises(grpc.RpcError) as e:
            ussd.choose("app_home_banner")
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
        assert "app_home_banner" in e.value.details()  # type: ignore[attr-defined]
        theirs = app.choose("app_home_banner", event_id="app-1")
        with pytest.raises(grpc.RpcError) as e:
            ussd.reward(theirs.event_id, 5.0)
        # Another placement's event is answered as an unknown one: the token learns nothing of it.
        assert _code(e) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as unknown:
            ussd.reward("no-such-event", 1.0)
        assert _code(unknown) == grpc.StatusCode.NOT_FOUND
        assert e.value.details().replace("app-1", "X") == unknown.value.details().replace("no-such-event", "X")  # type: ignore[attr-defined]
        mine2 = ussd.choose("ussd_main_menu")
        got = ussd.reward_batch([(mine2.event_id, 1.0), (theirs.event_id, 5.0), ("no-such-event", 1.0)])
        assert [r.status for r in got] == ["learned", "failed", "failed"]
        assert [str(r.error) for r in got[1:]] == ["NOT_FOUND: event 'app-1' is unknown", "NOT_FOUND: event 'no-such-event' is unknown"]
        assert app.reward("app-1", 2.0) == "learned"  # the denied reward did not close the window
    with client(authed.target, ADMIN_TOKEN) as admin:
        s = admin.stats("app_home_banner")
        assert s.decisions == 1 and sum(a.reward_sum for a in s.arms) == 2.0


def test_health_and_reflection_stay_open(authed: ServerThread) -> None:
    with grpc.insecure_channel(authed.target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(service="nextbest.v1.DecisionService"), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert "nextbest.v1.AdminService" in {s.name for s in resp.list_services_response.service}


def test_tokens_are_never_logged(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = ServerThread(make_settings(db_url, auth_tokens=TOKENS))
    try:
        with client(s.target, ADMIN_TOKEN) as admin:
            admin.apply([envs.placement("app_home_banner")])
        with client(s.target, LIMITED_TOKEN) as ussd, client(s.target, "guess-" + CHANNEL_TOKEN) as bad:
            for call in (lambda: ussd.choose("app_home_banner"), lambda: bad.choose("app_home_banner")):
                with pytest.raises(grpc.RpcError):
                    call()
    finally:
        s.stop()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "denied /nextbest.v1.DecisionService/Choose on placement 'app_home_banner' to token ussd" in text
    for secret in (CHANNEL_TOKEN, LIMITED_TOKEN, ADMIN_TOKEN):
        assert secret not in text


def test_token_file_and_variable_parse_to_roles_and_placements(tmp_path: Path) -> None:
    f = tmp_path / "tokens.yaml"
    f.write_text(
        "tokens:\n"
        f"  - {{name: web, sha256: {hash_token('w').upper()}, roles: [channel], placements: [a, b]}}\n"
        f"  - {{name: root, sha256: {hash_token('r')}, role: admin}}\n"
    )
    table = load_tokens(str(f), f"both:channel+admin:{hash_token('x')}")
    assert len(table) == 3
    web = table.authenticate([("authorization", "Bearer w")])
    assert web is not None and web.roles == {"channel"} and web.placements == {"a", "b"}
    both = table.authenticate([("authorization", "bearer  x ")])
    assert both is not None and both.roles == {"channel", "admin"} and both.placements is None
    assert table.authenticate([("authorization", "Bearer nope")]) is None
    assert table.authenticate([("x-other", "Bearer w")]) is None


@pytest.mark.parametrize(
    "text, field",
    [
        ("tokens: [{name: a, sha256: plain-token, roles: [channel]}]", "tokens[0].sha256"),
        (f"tokens: [{{name: a, sha256: {hash_token('a')}, roles: [root]}}]", "tokens[0].roles"),
        (f"tokens: [{{name: a, sha256: {hash_token('a')}, roles: [admin], extra: 1}}]", "tokens[0].extra"),
        (f"tokens: [{{name: 'a b', sha256: {hash_token('a')}, roles: [admin]}}]", "tokens[0].name"),
        (f"tokens: [{{name: a, sha256: {hash_token('a')}, roles: [channel], placements: []}}]", "tokens[0].placements"),
        (
            f"tokens: [{{name: a, sha256: {hash_token('a')}, roles: [admin]}}, {{name: b, sha256: {hash_token('a')}, roles: [admin]}}]",
            "tokens[1]",
        ),
        ("- just a list", "tokens.yaml"),
        ("tokens: {a: 1}", "tokens.yaml"),
        ("tokens: [unclosed", "tokens.yaml"),
    ],
)
def test_bad_token_files_name_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_file(text, "tokens.yaml")
    assert field in str(e.value)


def test_bad_token_variable_and_server_refuses_to_start(db_url: str) -> None:
    with pytest.raises(InvalidInput, match="entry 1"):
        parse_env("just-a-token")
    with pytest.raises(InvalidInput, match="sha256"):
        ServerThread(make_settings(db_url, auth_tokens="app:channel:secret"))


def test_hash_helper(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main([]) == 0
    assert capsys.readouterr().out.strip() == hash_token("s3cret") == ("1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0")
    assert main(["--new"]) == 0
    token, digest = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert len(token) >= 40 and digest == hash_token(token)


# -- TLS ----------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made here."""
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=nextbest test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}", cwd=d)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{who}.pem",
            "-days",
            "2",
            "-extfile",
            f"{who}.ext",
            cwd=d,
        )
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2", "-subj", "/CN=other", cwd=d)
    return d


def _tls_server(db_url: str, pki: Path, **kw: object) -> ServerThread:
    s = ServerThread(make_settings(db_url, tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"), **kw))
    return s


def test_tls_serves_clients_that_trust_the_ca_and_nobody_in_clear(db_url: str, pki: Path) -> None:
    s = _tls_server(db_url, pki, auth_tokens=TOKENS)
    try:
        creds = channel_credentials(str(pki / "ca.pem"))
        with client(s.target, ADMIN_TOKEN, creds) as admin:
            admin.apply([envs.placement()])
        with client(s.target, CHANNEL_TOKEN, creds) as c:
            assert c.choose("app_home_banner").arm_id in envs.ARMS
        # the standard call credentials carry the token too
        both = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(CHANNEL_TOKEN))
        with client(s.target, None, both) as c:
            assert c.choose("app_home_banner").arm_id in envs.ARMS
        for bad in (None, channel_credentials(str(pki / "other.pem"))):
            with client(s.target, CHANNEL_TOKEN, bad) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.choose("app_home_banner")
                assert _code(e) == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_mtls_requires_a_client_certificate_signed_by_the_client_ca(db_url: str, pki: Path) -> None:
    s = _tls_server(db_url, pki, tls_client_ca_file=str(pki / "ca.pem"))
    try:
        ok = channel_credentials(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
        with client(s.target, None, ok) as c:
            c.apply([envs.placement()])
            assert c.choose("app_home_banner").arm_id in envs.ARMS
        for bad in (
            channel_credentials(str(pki / "ca.pem")),
            channel_credentials(str(pki / "ca.pem"), str(pki / "other.pem"), str(pki / "other.key")),
        ):
            with client(s.target, None, bad) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.choose("app_home_banner")
                assert _code(e) == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_bad_tls_settings_are_refused_before_serving(db_url: str, pki: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="tls_key_file"):
        check_settings(str(pki / "server.pem"), "", "")
    with pytest.raises(InvalidInput, match="tls_client_ca_file"):
        check_settings("", "", str(pki / "ca.pem"))
    with pytest.raises(InvalidInput, match="tls_key_file"):
        server_credentials(str(pki / "server.pem"), str(pki / "server.pem"))  # a certificate is no key
    with pytest.raises(InvalidInput, match="tls_cert_file: cannot read"):
        server_credentials(str(tmp_path / "missing.pem"), str(pki / "server.key"))
    with pytest.raises(InvalidInput, match="tls_key_file"):
        ServerThread(make_settings(db_url, tls_cert_file=str(pki / "server.pem")))
    assert not Path(db_url.removeprefix("sqlite:///")).exists()  # refused before opening the store


def test_denied_calls_are_refused_before_their_request_is_parsed(authed: ServerThread) -> None:
    """A denied call is refused before its request is even parsed: garbage bytes get the same answer."""
    with grpc.insecure_channel(authed.target) as ch:
        raw = ch.unary_unary("/nextbest.v1.AdminService/GetStats", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff garbage", timeout=5)
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            raw(
                admin_pb2.GetStatsRequest(placement="app_home_banner").SerializeToString(),
                timeout=5,
                metadata=[("authorization", f"Bearer {CHANNEL_TOKEN}")],
            )
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED


def test_client_and_cli_take_token_and_ca_from_the_environment(db_url: str, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import sys

    from tests.harness import ROOT

    s = _tls_server(db_url, pki, auth_tokens=TOKENS)
    try:
        monkeypatch.setenv("NEXTBEST_CA_FILE", str(pki / "ca.pem"))
        monkeypatch.setenv("NEXTBEST_TOKEN", ADMIN_TOKEN)
        with NextbestClient(s.target) as c:
            c.apply([envs.placement()])
        cmd = [sys.executable, "-m", "nextbest.cli.main", "stats", "app_home_banner", "--target", s.target]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and "placement app_home_banner: 0 decisions" in r.stdout, r.stderr
        env = {k: v for k, v in os.environ.items() if k != "NEXTBEST_TOKEN"}
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env, check=False)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
    finally:
        s.stop()
