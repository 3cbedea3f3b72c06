"""Config validation: every problem names its key path; env overrides; the shipped example validates."""

import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from sample_gateway.app import create_app
from sample_gateway.config import (
    GatewayConfig,
    GatewayConfigError,
    load_config,
    parse_config,
    parse_config_text,
)
from sample_gateway.registry import MemoryRegistryStore
from sample_gateway.runtime import GatewayRuntime

ROOT = Path(__file__).resolve().parents[2]


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "services": [{"name": "users", "targets": [{"url": "http://127.0.0.1:9001"}]}],
        "routes": [{"path": "/users/*", "service": "users"}],
        "admin": {"api_keys": ["k"]},
    }
    data.update(extra)
    return data


def test_example_config_validates_and_exercises_every_section() -> None:
    config = load_config(ROOT / "examples" / "gateway.yaml", environ={})
    text = (ROOT / "examples" / "gateway.yaml").read_text()
    for section in type(config).model_fields:
        assert f"\n{section}:" in text, f"examples/gateway.yaml has no {section} section"
    strategies = {service.load_balancing.strategy for service in config.services}
    assert strategies == {
        "weighted_round_robin",
        "least_connections",
        "power_of_two",
        "consistent_hash",
    }
    users = config.routes[0]
    assert users.strip_prefix == "/api" and users.canary and users.auth == "required"
    assert config.routes[1].split is not None and config.routes[1].sticky is not None
    assert config.admin.api_keys[0].get_secret_value() == "change-me-admin-key"
    assert config.auth.location.cookie == "access_token" and config.auth.close_expired_websockets
    assert config.rate_limits.websocket_messages == ["20/second", "600/minute"]


def test_the_example_config_wires_every_layer_it_configures() -> None:
    config = load_config(ROOT / "examples" / "gateway.yaml", environ={})
    runtime = GatewayRuntime(config, registry_store=MemoryRegistryStore())
    create_app(config, runtime=runtime)
    assert runtime.layers == [
        "problem_details",
        "request_id",
        "metrics",
        "access_log",
        "security_headers",
        "body_limit",
        "auth",
        "rate_limits",
        "rbac",
        "breakers",
        "overload",
    ]
    assert runtime.metrics_endpoint is not None and runtime.rate_limit_policies is not None
    assert runtime.breaker_states is not None and runtime.breaker_states() == []


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        ({"listen": {"port": 70000}}, "listen.port", "less than or equal to 65535"),
        ({"listen": {"port": "http"}}, "listen.port", "valid integer"),
        ({"listen": {"hots": "x"}}, "listen.hots", "unknown key"),
        (
            {"services": [{"name": "users", "targets": [{"url": "http://h:1/api"}]}]},
            "services[0].targets[0].url",
            "scheme, host and port only",
        ),
        (
            {"services": [{"name": "users", "targets": [{"url": "ftp://h:1"}]}]},
            "services[0].targets[0].url",
            "http:// or https://",
        ),
        (
            {"services": [{"name": "users", "targets": [{"url": "http://h:1", "weight": 0}]}]},
            "services[0].targets[0].weight",
            "greater than or equal to 1",
        ),
        (
            {"services": [{"name": "users", "load_balancing": {"strategy": "random"}}]},
            "services[0].load_balancing.strategy",
            "round_robin",
        ),
        (
            {
                "services": [
                    {"name": "users", "load_balancing": {"strategy": "consistent_hash", "hash_on": "header"}}
                ]
            },
            "services[0].load_balancing",
            "hash_key is required",
        ),
        (
            {"services": [{"name": "users", "health_check": {"interval": 0}}]},
            "services[0].health_check.interval",
            "greater than 0",
        ),
        ({"services": [{"name": "users"}, {"name": "users"}]}, "services[1].name", "duplicate service name"),
        ({"routes": [{"path": "/x", "service": "nope"}]}, "routes[0].service", "unknown service 'nope'"),
        ({"routes": [{"path": "x", "service": "users"}]}, "routes[0].path", "must start with '/'"),
        (
            {"routes": [{"path": "/x", "host": "api.example.com:8443", "service": "users"}]},
            "routes[0].host",
            "without a port",
        ),
        ({"routes": [{"path": "/x"}]}, "routes[0]", "exactly one of service or split"),
        (
            {"routes": [{"path": "/x", "service": "users", "methods": ["GRAB"]}]},
            "routes[0].methods",
            "unknown HTTP methods ['GRAB']",
        ),
        (
            {"routes": [{"path": "/x", "split": [{"service": "users", "weight": 0}]}]},
            "routes[0]",
            "must not all be zero",
        ),
        (
            {"routes": [{"path": "/x", "service": "users", "strip_prefix": "/x", "rewrite": "/y"}]},
            "routes[0]",
            "strip_prefix or rewrite, not both",
        ),
        (
            {"routes": [{"path": "/x/{id}", "service": "users", "rewrite": "/y/{name}"}]},
            "routes[0].rewrite",
            "uses {name}",
        ),
        (
            {"routes": [{"path": "/x", "service": "users", "canary": [{"header": "x-c", "matches": "("}]}]},
            "routes[0].canary[0]",
            "not a valid regular expression",
        ),
        (
            {"routes": [{"path": "/x", "service": "users", "rate_limits": ["gold"]}]},
            "routes[0].rate_limits[0]",
            "unknown rate-limit policy 'gold'",
        ),
        (
            {"routes": [{"path": "/_admin/x", "service": "users"}]},
            "routes[0].path",
            "overlaps the admin prefix",
        ),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies[0]", "not an address or CIDR"),
        ({"storage": {"default": "mysql://x"}}, "storage.default", "memory:// or a redis://"),
        ({"admin": {"api_keys": [], "roles": []}}, "admin", "needs api_keys or roles"),
        (
            {"rate_limits": {"policies": {"p": {"limits": ["lots"]}}}},
            "rate_limits.policies.p.limits",
            "'lots'",
        ),
        (
            {"routes": [{"path": "/users/*", "service": "users", "auth": "required"}]},
            "routes[0].auth",
            "no issuers and no api_keys",
        ),
        (
            {"routes": [{"path": "/users/*", "service": "users", "roles": ["ops"]}]},
            "routes[0].roles",
            "needs auth 'required' or 'optional'",
        ),
        (
            {"routes": [{"path": "/users/*", "service": "users", "max_concurrent": 0}]},
            "routes[0].max_concurrent",
            "greater than or equal to 1",
        ),
        (
            {"auth": {"issuers": [{"issuer": "https://i/", "jwks_url": "https://i/jwks"}]}},
            "auth.issuers[0].audiences",
            "at least one non-empty audience",
        ),
        (
            {"auth": {"api_keys": {"keys": [{"key_id": "abcd", "owner": "o"}]}}},
            "auth.api_keys.keys",
            "needs 'secret_hash'",
        ),
        ({"auth": {"location": {"cookie": "at;x"}}}, "auth.location.cookie", "is not a cookie name"),
        (
            {"auth": {"location": {"query": "access token"}}},
            "auth.location.query",
            "not a query parameter name",
        ),
        ({"auth": {"location": {"query": ""}}}, "auth.location.query", "not a query parameter name"),
        ({"auth": {"location": {"header": "x-token"}}}, "auth.location.header", "unknown key"),
        ({"auth": {"location": {"query": "access_token"}}}, "auth.location", "needs auth.issuers"),
        (
            {"rate_limits": {"websocket_messages": ["fast"]}},
            "rate_limits.websocket_messages",
            "'fast' is not",
        ),
        ({"metrics": {"allow": ["10.0.0.0/33"]}}, "metrics.allow", "not an address, a CIDR or '*'"),
        ({"metrics": {"path": "metrics"}}, "metrics.path", "must start with '/'"),
    ],
)
def test_a_bad_config_names_the_key_and_the_problem(change: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(GatewayConfigError) as caught:
        parse_config(minimal(**change), source="gateway.yaml")
    message = str(caught.value)
    assert f"gateway.yaml: {key}: " in message, message
    assert problem in message, message
    assert any(path == key for path, _ in caught.value.problems)


def test_several_problems_are_reported_at_once() -> None:
    with pytest.raises(GatewayConfigError) as caught:
        parse_config(minimal(listen={"port": 0}, trusted_proxies="x"))
    assert {path for path, _ in caught.value.problems} == {"listen.port", "trusted_proxies"}


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(GatewayConfigError, match=r"bad.yaml: <root>: not valid YAML: line 3, column 2"):
        parse_config_text("listen:\n  port: 1\n bad: [\n", source="bad.yaml")


def test_a_missing_file_fails_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match=r"missing.yaml: <root>: cannot read the file"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_the_root_must_be_a_mapping() -> None:
    with pytest.raises(GatewayConfigError, match="must be a mapping"):
        parse_config_text("- a\n- b\n")


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("NEXUS__LISTEN__PORT", "9000", lambda c: c.listen.port == 9000),
        ("nexus__listen__host", "0.0.0.0", lambda c: c.listen.host == "0.0.0.0"),
        ("NEXUS__ADMIN__ENABLED", "false", lambda c: c.admin.enabled is False),
        (
            "NEXUS__TRUSTED_PROXIES",
            "[10.0.0.0/8, 127.0.0.1]",
            lambda c: c.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"],
        ),
        ("NEXUS__SERVICES__0__TIMEOUTS__READ", "5", lambda c: c.services[0].timeouts.read == 5.0),
        ("NEXUS__SERVICES__USERS__RETRY__ATTEMPTS", "4", lambda c: c.services[0].retry.attempts == 4),
        ("NEXUS__SERVICES__USERS__TARGETS__0__WEIGHT", "7", lambda c: c.services[0].targets[0].weight == 7),
        (
            "NEXUS__ADMIN__API_KEYS",
            "[secret-one]",
            lambda c: c.admin.api_keys[0].get_secret_value() == "secret-one",
        ),
        (
            "NEXUS__STORAGE__REGISTRY",
            "redis://r:6379/0",
            lambda c: c.storage.uri_for("registry") == "redis://r:6379/0",
        ),
    ],
)
def test_environment_overrides_any_value(variable: str, value: str, read: Any) -> None:
    config = parse_config(minimal(), environ={variable: value, "UNRELATED": "x"})
    assert read(config)


def test_environment_override_errors_name_the_variable() -> None:
    with pytest.raises(
        GatewayConfigError, match=r"environment: NEXUS__SERVICES__NOPE__WEIGHT: 'nope' is neither"
    ):
        parse_config(minimal(), environ={"NEXUS__SERVICES__NOPE__WEIGHT": "1"})
    with pytest.raises(GatewayConfigError, match=r"listen.port: Input should be less than or equal to 65535"):
        parse_config(minimal(), environ={"NEXUS__LISTEN__PORT": "99999"})


def test_load_config_reads_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: {port: 8000}\nadmin: {api_keys: [k]}\n")
    monkeypatch.setenv("NEXUS__LISTEN__PORT", "9100")
    assert load_config(path).listen.port == 9100


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        nested = len(keys)
        for candidate in (field.annotation, *_flatten(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                origin = typing.get_origin(field.annotation)
                text = str(field.annotation)
                if text.startswith("dict"):
                    keys.extend(_keys(candidate, key + ".<name>."))
                elif text.startswith("list") or origin is list:
                    keys.extend(_keys(candidate, key + "[]."))
                else:
                    keys.extend(_keys(candidate, key + "."))
        if len(keys) == nested:
            keys.append(key)  # a leaf: sections are documented through their keys
    return keys


def _flatten(annotation: Any) -> list[Any]:
    found = []
    for argument in typing.get_args(annotation):
        found.append(argument)
        found.extend(_flatten(argument))
    return found


def test_the_reference_documents_every_key() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = [key for key in _keys(GatewayConfig) if f"`{key}`" not in reference]
    assert missing == []


def test_the_kubernetes_manifests_carry_a_valid_config_and_the_probes() -> None:
    import yaml

    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    by_kind = {document["kind"]: document for document in documents}
    embedded = by_kind["ConfigMap"]["data"]["gateway.yaml"]
    config = parse_config_text(embedded, environ={"NEXUS__ADMIN__API_KEYS": "[from-the-secret]"})
    assert config.admin.api_keys[0].get_secret_value() == "from-the-secret"
    (container,) = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["env"][0]["name"] == "NEXUS__ADMIN__API_KEYS"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "sample_gateway"]' in dockerfile
    assert '".[gateway,redis,fast]"' in dockerfile  # uvicorn's compiled loop and parser in production
