"""Access control over real servers on loopback: tokens, principals, artifact and job rights, TLS, mTLS.

Certificates are made here with the `cryptography` package (a CA, a server certificate for localhost and
127.0.0.1, client certificates, and a rogue CA nobody trusts). Servers run in this process with
`build_server`; the Editor reaches a separate stage server over mutual TLS with its own token.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loopback import tiny_server_config

from clients import ClientError, TokenFlowClient, decode_spec, edit_spec, inversion_spec
from services.access import INPUT_FIELDS, PUBLIC_META
from services.auth import ON_BEHALF_HEADER, TokenTable
from services.config import ServerConfig
from services.server import RunningServer, build_server
from services.store import ArtifactStore
from tokenflow_pb.v1 import artifacts_pb2, artifacts_pb2_grpc

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKENS = {name: f"{name}-{secrets.token_hex(16)}" for name in ("alice", "bob", "carol", "root")}
FAST_DECODE = decode_spec(size=(64, 64), max_frames=6)
FAST_INVERSION = inversion_spec(steps=4, edit_steps=2, reconstruct=False)


# ----------------------------------------------------------------------------------------------------------
# certificates


def _name(common: str) -> Any:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, key: Any, cert: Any) -> tuple[Path, Path]:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path.with_suffix(".pem"), path.with_suffix(".key")


def _ca(directory: Path, common: str) -> tuple[Any, Any, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path, _ = _write(directory / common, key, cert)
    return key, cert, path


def _leaf(directory: Path, common: str, ca_key: Any, ca_cert: Any, server: bool) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:  # the servers' certificate is also the Editor's client certificate towards the stages
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.2")),
                ]
            ),
            critical=False,
        )
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return _write(directory / common, key, builder.sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca = _ca(d, "tokenflow-test-ca")
    rogue_key, rogue_cert, rogue_ca = _ca(d, "rogue-ca")
    server_cert, server_key = _leaf(d, "server", ca_key, ca_cert, server=True)
    alice_cert, alice_key = _leaf(d, "alice", ca_key, ca_cert, server=False)
    rogue_client_cert, rogue_client_key = _leaf(d, "mallory", rogue_key, rogue_cert, server=False)
    return {
        "ca": ca,
        "rogue_ca": rogue_ca,
        "server_cert": server_cert,
        "server_key": server_key,
        "alice_cert": alice_cert,
        "alice_key": alice_key,
        "rogue_cert": rogue_client_cert,
        "rogue_key": rogue_client_key,
    }


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(
        "# token principal role\n"
        f"{TOKENS['root']}  root  admin   # the Editor's credential too (first admin)\n"
        f"{TOKENS['alice']} alice\n"
        f"{TOKENS['bob']}   bob   user\n"
        "\n"
        f"{TOKENS['carol']}\n"  # a bare token: its own principal
    )
    return path


def _config(tmp: Path, services: str, **kw: Any) -> ServerConfig:
    base: dict[str, Any] = {"dtype": "float32", "job_grace_seconds": 5, "max_connection_age_seconds": None}
    return tiny_server_config(tmp / "cache", **(base | {"services": services} | kw))


@pytest.fixture(scope="module")
def model_host() -> Iterator[Any]:
    from services.model_host import ModelHost

    host = ModelHost("tiny", device="cpu", dtype="float32")
    yield host
    host.close()


def _client(target: str, who: str | None, **kw: Any) -> TokenFlowClient:
    return TokenFlowClient(target, timeout=60, token=TOKENS[who] if who else "", **kw)


def _code(excinfo: pytest.ExceptionInfo[ClientError]) -> grpc.StatusCode:
    return excinfo.value.code


# ----------------------------------------------------------------------------------------------------------
# the token file


def test_token_file_format(tmp_path: Path, token_file: Path) -> None:
    table = TokenTable.load(token_file)
    assert len(table) == 4
    assert table.authenticate(TOKENS["alice"]).name == "alice"  # type: ignore[union-attr]
    assert table.authenticate(TOKENS["alice"]).role == "user"  # type: ignore[union-attr]
    root = table.authenticate(TOKENS["root"])
    assert root is not None and root.name == "root" and root.is_admin
    carol = table.authenticate(TOKENS["carol"])
    assert carol is not None and carol.name == TOKENS["carol"] and carol.role == "user"
    assert table.authenticate(TOKENS["alice"] + "x") is None
    assert table.authenticate("") is None
    assert table.admin_token == TOKENS["root"]
    assert TOKENS["root"] not in repr(table)

    for text, complaint in (
        ("", "no token"),
        (f"{TOKENS['bob']} bob\n{TOKENS['bob']} robert\n", "twice"),
        ("short alice\n", "16 characters"),
        (f"{TOKENS['bob']} bob superuser\n", "unknown role"),
        (f"{TOKENS['bob']} bob user extra\n", "TOKEN [PRINCIPAL [ROLE]]"),
    ):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
            TokenTable.load(bad)


def test_refusals_read_like_misses() -> None:
    """A stage input the caller may not read is refused with the stages' own words for a miss."""
    from services import inversion

    digest = "ab" * 32
    assert INPUT_FIELDS["video_digest"].format(digest=digest) == str(inversion._missing_video(digest))
    assert INPUT_FIELDS["inversion_digest"].format(digest=digest) == str(inversion._missing_inversion(digest))
    assert INPUT_FIELDS["shard_digests"].format(digest=digest) == str(inversion._missing_inversion(digest))
    assert not {"filename", "media_type", "video_digest", "inversion", "edit", "decode"} & PUBLIC_META


def test_every_digest_in_a_request_is_checked() -> None:
    """Every request field naming artifacts is an input the interceptor checks, or Artifacts' own `digest`
    (Get, Download, Delete check it themselves): a new one cannot slip past access control."""
    from tokenflow_pb.v1 import (
        editor_pb2,
        inversion_pb2,
        keyframes_pb2,
        propagation_pb2,
        server_info_pb2,
    )

    names: set[str] = set()
    for module in (artifacts_pb2, inversion_pb2, keyframes_pb2, propagation_pb2, editor_pb2, server_info_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                names.update(
                    f.name for f in method.input_type.fields if f.name.endswith(("digest", "digests"))
                )
    assert "video_digest" in names and "inversion_digest" in names
    assert names - {"digest"} <= set(INPUT_FIELDS), names


# ----------------------------------------------------------------------------------------------------------
# tokens on a plaintext server (Artifacts only: no model)


@pytest.fixture(scope="module")
def artifacts_server(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("artifacts-server")
    running = build_server(_config(tmp, "artifacts", auth_token_file=token_file))
    yield running
    running.stop(grace=0)


def test_no_token_wrong_token_right_token(
    artifacts_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    target = artifacts_server.target
    caplog.set_level(logging.DEBUG)
    with _client(target, None) as anonymous:
        with pytest.raises(ClientError) as e:
            anonymous.upload(b"some video bytes", filename="a.mp4")
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
        assert e.value.reason == "UNAUTHENTICATED" and e.value.metadata == {"problem": "missing"}
        assert anonymous.health(timeout=10) == "SERVING"  # health needs no token
        with pytest.raises(ClientError) as e:
            anonymous.stat("00" * 32)
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED

    wrong = "wrong-" + secrets.token_hex(16)
    with TokenFlowClient(target, timeout=30, token=wrong) as impostor:
        with pytest.raises(ClientError) as e:
            impostor.list_artifacts("video")
        assert e.value.metadata == {"problem": "invalid"} and e.value.retry_delay is None
    assert wrong not in caplog.text

    channel = grpc.insecure_channel(target)
    try:
        stub = artifacts_pb2_grpc.ArtifactsStub(channel)
        with pytest.raises(grpc.RpcError) as raw:
            stub.Get(artifacts_pb2.GetRequest(digest="00" * 32), metadata=[("authorization", "Basic abc")])
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # only an admin may act on behalf of someone else
        with pytest.raises(grpc.RpcError) as raw:
            stub.Get(
                artifacts_pb2.GetRequest(digest="00" * 32),
                metadata=[("authorization", f"Bearer {TOKENS['bob']}"), (ON_BEHALF_HEADER, "alice")],
            )
        assert raw.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # reflection needs a token too
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as raw:
            list(
                reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            )
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(
            reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=[("authorization", f"Bearer {TOKENS['carol']}")],
            )
        )
        assert any(s.name == "tokenflow.v1.Artifacts" for s in answers[0].list_services_response.service)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()

    with _client(target, "carol") as carol:
        ref = carol.upload_ref(b"carol's bytes " * 10, filename="carol.mp4")
        assert len(ref.digest) == 64 and not ref.existed


def test_metadata_visibility_and_upload_oracle(artifacts_server: RunningServer) -> None:
    target = artifacts_server.target
    data = secrets.token_bytes(4096)
    with (
        _client(target, "alice") as alice,
        _client(target, "bob") as bob,
        _client(target, "carol") as carol,
        _client(target, "root") as root,
    ):
        first = alice.upload_ref(data, filename="alice-holiday.mp4")
        assert not first.existed
        assert alice.upload_ref(data, filename="alice-holiday.mp4").existed  # her own upload: true
        digest = first.digest

        # Someone else holding the same bytes learns nothing from Upload...
        assert not bob.upload_ref(data, filename="bob.mp4").existed
        # ... nor does a principal with no relation to it, from Stat, Download, List or Delete.
        absent = "12" * 32
        for call in (lambda d: carol.stat(d), lambda d: carol.download(d, Path("/nonexistent/x"))):
            with pytest.raises(ClientError) as seen:
                call(digest)
            with pytest.raises(ClientError) as missing:
                call(absent)
            assert _code(seen) == _code(missing) == grpc.StatusCode.NOT_FOUND
            assert seen.value.message.replace(digest, "D") == missing.value.message.replace(absent, "D")
        assert digest not in {a.digest for a in carol.iter_artifacts("video")}
        with pytest.raises(ClientError) as seen:
            carol.delete(digest)
        assert _code(seen) == grpc.StatusCode.NOT_FOUND

        # The creator sees the user data; another uploader sees the rest; an admin sees everything.
        import json

        alice_meta = json.loads(alice.stat(digest).meta_json)
        bob_meta = json.loads(bob.stat(digest).meta_json)
        root_meta = json.loads(root.stat(digest).meta_json)
        assert alice_meta["filename"] == "alice-holiday.mp4" == root_meta["filename"]
        assert "filename" not in bob_meta and "media_type" not in bob_meta
        assert bob_meta["size"] == len(data)
        assert bob.stat(digest).total_size == len(data)
        assert digest in {a.digest for a in alice.iter_artifacts("video")}
        assert "alice-holiday" not in json.dumps(
            [json.loads(a.meta_json) for a in bob.iter_artifacts("video")]
        )


def test_download_names_no_one_elses_file(artifacts_server: RunningServer, tmp_path: Path) -> None:
    data = secrets.token_bytes(2048)
    with _client(artifacts_server.target, "alice") as alice, _client(artifacts_server.target, "bob") as bob:
        digest = alice.upload(data, filename="alice-private-name.mp4")
        bob.upload(data, filename="b.mp4")
        (tmp_path / "bob").mkdir()
        path = bob.download(digest, tmp_path / "bob")
        assert path.read_bytes() == data and "alice-private-name" not in path.name
        (tmp_path / "alice").mkdir()
        assert alice.download(digest, tmp_path / "alice").name == "alice-private-name.mp4"


# ----------------------------------------------------------------------------------------------------------
# jobs: cancel rights (a real inversion stage)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenflow.synthetic import make_clip

    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=6, size=(64, 64), audio=False)


def test_cancel_rights(tmp_path: Path, token_file: Path, model_host: Any, clip: Path) -> None:
    with build_server(
        _config(tmp_path, "inversion", auth_token_file=token_file), model_host=model_host
    ) as running:
        target = running.target
        with (
            _client(target, "alice") as alice,
            _client(target, "bob") as bob,
            _client(target, "root") as root,
        ):
            video = alice.upload(clip)
            # bob cannot use alice's video as an input: it does not exist for him
            with pytest.raises(ClientError) as e:
                bob.invert(video, FAST_DECODE, FAST_INVERSION)
            assert _code(e) == grpc.StatusCode.NOT_FOUND and e.value.reason == "ARTIFACT_NOT_FOUND"

            job_id: list[str] = []
            started = threading.Event()
            outcome: list[BaseException | None] = []

            def on_event(event: Any) -> None:
                if event.WhichOneof("event") == "progress" and event.progress.job_id:
                    job_id.append(event.progress.job_id)
                    started.set()

            def run() -> None:
                try:  # long enough to be cancelled: 1000 inversion steps
                    alice.invert(
                        video,
                        FAST_DECODE,
                        inversion_spec(steps=1000, edit_steps=2, reconstruct=False),
                        on_event=on_event,
                        timeout=300,
                    )
                    outcome.append(None)
                except BaseException as exc:  # noqa: BLE001 - inspected below
                    outcome.append(exc)
                finally:
                    started.set()

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            assert started.wait(120) and job_id, outcome
            with pytest.raises(ClientError) as e:
                bob.cancel("inversion", job_id[0])
            assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
            assert e.value.reason == "PERMISSION_DENIED" and e.value.metadata == {"action": "cancel"}
            # google.longrunning.Operations over the same job: invisible to bob, alice's to see
            for call in (bob.get_operation, bob.cancel_operation):
                with pytest.raises(ClientError) as e:
                    call(job_id[0])
                assert _code(e) == grpc.StatusCode.NOT_FOUND
            assert alice.get_operation(job_id[0]).name.endswith(job_id[0])
            assert not [op for op in bob.list_operations() if op.name.endswith(job_id[0])]
            assert [op for op in alice.list_operations() if op.name.endswith(job_id[0])]
            assert root.cancel("inversion", job_id[0]).cancelled  # an admin may
            worker.join(120)
            assert outcome and isinstance(outcome[0], ClientError), outcome
            assert outcome[0].code == grpc.StatusCode.CANCELLED

            # alice may cancel her own job
            worker = threading.Thread(target=run, daemon=True)
            job_id.clear()
            outcome.clear()
            started.clear()
            worker.start()
            assert started.wait(120) and job_id, outcome
            assert alice.cancel("inversion", job_id[0]).cancelled
            worker.join(120)
            assert (
                outcome
                and isinstance(outcome[0], ClientError)
                and outcome[0].code == grpc.StatusCode.CANCELLED
            )


# ----------------------------------------------------------------------------------------------------------
# TLS and mutual TLS, with the Editor reaching a separate stage server over mTLS


def test_tls_mtls_and_editor_internal_channels(
    tmp_path: Path, pki: dict[str, Path], token_file: Path, model_host: Any, clip: Path
) -> None:
    tls = {"tls_cert": pki["server_cert"], "tls_key": pki["server_key"], "tls_client_ca": pki["ca"]}
    store = ArtifactStore(tmp_path / "shared-cache", size_limit=1 << 30)
    try:
        with build_server(
            _config(tmp_path, "inversion,keyframes,propagation", auth_token_file=token_file, **tls),
            model_host=model_host,
            store=store,
        ) as stages:
            # The Editor trusts --tls-client-ca for the stages and presents its own certificate (defaults).
            editor_config = _config(
                tmp_path,
                "editor",
                auth_token_file=token_file,
                inversion_addr=stages.target,
                keyframes_addr=stages.target,
                propagation_addr=stages.target,
                stage_wait_seconds=60,
                **tls,
            )
            with build_server(editor_config, store=store) as editor:
                target = editor.target
                good = {"tls_ca": pki["ca"], "tls_cert": pki["alice_cert"], "tls_key": pki["alice_key"]}

                # plaintext to a TLS server, no client certificate, a rogue client CA, an untrusted server
                for kw in (
                    {},
                    {"tls_ca": pki["ca"]},
                    {"tls_ca": pki["ca"], "tls_cert": pki["rogue_cert"], "tls_key": pki["rogue_key"]},
                    {"tls_ca": pki["rogue_ca"], "tls_cert": pki["alice_cert"], "tls_key": pki["alice_key"]},
                ):
                    with _client(target, "alice", **kw) as refused, pytest.raises(ClientError) as e:
                        refused.health(timeout=5)
                    assert _code(e) == grpc.StatusCode.UNAVAILABLE, kw

                with _client(target, "alice", **good) as alice, _client(target, "bob", **good) as bob:
                    assert alice.health(timeout=10) == "SERVING"
                    results = alice.edit(
                        clip,
                        edit_spec("a marble statue", seed=1),
                        decode=FAST_DECODE,
                        inversion=FAST_INVERSION,
                        keyframes_only=True,
                        timeout=300,
                    )
                    (result,) = results
                    assert result.files
                    import json

                    meta = json.loads(alice.stat(result.digest).meta_json)
                    assert meta["edit"]["prompt"] == "a marble statue"
                    with pytest.raises(ClientError) as e:
                        bob.stat(result.digest)
                    assert _code(e) == grpc.StatusCode.NOT_FOUND

                # The stages ran the jobs for alice (delegated by the Editor's admin token), so alice may
                # read the preview on the stage server too, and bob may not.
                with _client(stages.target, "alice", **good) as alice_at_stage:
                    names = [f.name for f in alice_at_stage.stat(result.digest).files]
                    assert names
                # No token: the stage server refuses even a client with a valid certificate.
                with _client(stages.target, None, **good) as anonymous, pytest.raises(ClientError) as e:
                    anonymous.stat(result.digest)
                assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        store.close()


def test_editor_needs_a_stage_credential(tmp_path: Path) -> None:
    tokens = tmp_path / "users.txt"
    tokens.write_text(f"{TOKENS['alice']} alice\n")
    with pytest.raises(ValueError, match="internal-token-file"):
        build_server(_config(tmp_path, "all", auth_token_file=tokens))
    with pytest.raises(ValueError, match="--tls-key"):
        _config(tmp_path, "artifacts", tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        _config(tmp_path, "artifacts", tls_client_ca=tmp_path / "ca.pem")


def test_manifests_bind_every_interface_explicitly() -> None:
    """The server binds loopback by default, so every container must ask for 0.0.0.0 itself."""
    import yaml

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    arg_lists: list[list[str]] = []
    for name in ("inversion", "keyframes", "propagation", "editor"):
        for doc in yaml.safe_load_all((deploy / "k8s" / f"{name}.yaml").read_text()):
            if doc and doc.get("kind") == "Deployment":
                (container,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c.get("args")]
                arg_lists.append([str(a) for a in container["args"]])
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    arg_lists += [
        [str(a) for a in s["command"]]
        for s in compose["services"].values()
        if "command" in s and any(str(a).startswith("--services") for a in s["command"])
    ]
    assert len(arg_lists) == 8
    for args in arg_lists:
        assert "--host=0.0.0.0" in args and "--metrics-host=0.0.0.0" in args, args


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("tokenflow-self-signed"))
        .issuer_name(_name("tokenflow-self-signed"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _write(directory / "self-signed", key, cert)


def test_embedded_server_with_a_self_signed_certificate(
    tmp_path: Path, token_file: Path, model_host: Any, clip: Path
) -> None:
    """`--services all` with one self-signed certificate: the Editor trusts it for its own stages (the
    default), and presents the token of --internal-token-file."""
    cert, key = _self_signed(tmp_path)
    internal = tmp_path / "internal-token"
    internal.write_text(f"# the Editor's credential\n{TOKENS['root']}\n")
    config = _config(
        tmp_path, "all", auth_token_file=token_file, internal_token_file=internal, tls_cert=cert, tls_key=key
    )
    with build_server(config, model_host=model_host) as running:
        with _client(running.target, "alice", tls_ca=cert) as alice:
            (result,) = alice.edit(
                clip,
                edit_spec("a paper sculpture", seed=2),
                decode=FAST_DECODE,
                inversion=FAST_INVERSION,
                keyframes_only=True,
                timeout=300,
            )
            assert result.files and alice.stat(result.digest).digest == result.digest


def test_client_command_line_token_and_tls(
    artifacts_server: RunningServer,
    tmp_path: Path,
    pki: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """tokenflow-client: --token, TOKENFLOW_TOKEN, and --tls-ca/--tls-cert/--tls-key."""
    import json

    from clients.cli import main

    target = artifacts_server.target
    monkeypatch.delenv("TOKENFLOW_TOKEN", raising=False)
    assert main(["--target", target, "list", "video"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["--target", target, "--token", TOKENS["bob"], "list", "video"]) == 0
    json.loads(capsys.readouterr().out)
    monkeypatch.setenv("TOKENFLOW_TOKEN", TOKENS["bob"])
    assert main(["--target", target, "list", "video"]) == 0
    capsys.readouterr()

    tls = {"tls_cert": pki["server_cert"], "tls_key": pki["server_key"], "tls_client_ca": pki["ca"]}
    with build_server(_config(tmp_path, "artifacts", **tls)) as running:
        flags = ["--target", running.target, "--timeout", "10"]
        assert main([*flags, "health"]) == 1  # plaintext
        client_tls = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["alice_cert"])]
        assert main([*flags, *client_tls, "--tls-key", str(pki["alice_key"]), "health"]) == 0
        assert capsys.readouterr().out.strip().endswith("SERVING")
