"""The load balancer's configuration (mlpipe_ops.balancer) and how its refusals are reported."""

from __future__ import annotations

from pathlib import Path

from mlpipe_ops import balancer, statedir


def test_each_service_gets_a_frontend_on_its_port_and_its_instances_in_turn() -> None:
    config = balancer.render(
        {"ingest": 8682, "predictor": 8686}, {"ingest": [8687, 8688], "predictor": [8695, 8696]}
    )

    blocks = config.split("\nfrontend ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["ingest", "predictor"]
    assert "    bind 127.0.0.1:8682" in blocks[0] and "    bind 127.0.0.1:8686" in blocks[1]
    assert "server predictor-1 127.0.0.1:8695" in blocks[1]
    assert "server predictor-2 127.0.0.1:8696" in blocks[1]
    assert config.count("balance roundrobin") == 2
    assert config.count("option httpchk GET /healthz") == 2
    # Longer than Pub/Sub's 600 s push deadline: the balancer never cuts a push short.
    assert "timeout server 610s" in config and "timeout client 610s" in config
    assert "0.0.0.0" not in config


def test_a_refusal_quotes_haproxy_and_the_line_it_names(tmp_path: Path) -> None:
    config = balancer.write_config(tmp_path, {"ingest": 1}, {"ingest": [2]})
    lines = config.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if "balance roundrobin" in line)
    said = (
        f"[NOTICE]   (1) : haproxy version is 2.6.12\n"
        f"[ALERT]    (1) : config : parsing [{config}:{number}] : 'balance' only supports "
        f"'roundrobin', 'static-rr', 'leastconn'.\n"
        f"[ALERT]    (1) : config : Fatal errors found in configuration.\n"
    )

    message = balancer.refusal(config, said)

    assert "'balance' only supports" in message and "NOTICE" not in message
    assert message.endswith(f"{config}:{number}: balance roundrobin")


def test_the_configuration_lives_where_down_wipe_removes_it(tmp_path: Path) -> None:
    config = balancer.write_config(tmp_path, {"ingest": 1}, {"ingest": [2]})

    assert config.parent.name in statedir.DATA
