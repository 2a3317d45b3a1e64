"""Flow limits and the new-flow rate as options: the CLI and RelayConfig refuse bad
values naming the option or field, and good ones reach the config. What the limits do
to a real guest's traffic: tests/integration/test_limits.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,option,says", [
    # `-4`/`-6` exist, so argparse takes "-1" for an option and reports the missing value;
    # with "=" the value reaches the option's own check.
    (["--new-flow-rate", "-1"], "--new-flow-rate", "expected one argument"),
    (["--new-flow-rate=-1"], "--new-flow-rate", "must be a positive number"),
    (["--new-flow-rate", "0"], "--new-flow-rate", "must be a positive number"),
    (["--new-flow-rate", "abc"], "--new-flow-rate", "is not a number of flows per second"),
    (["--new-flow-rate", "inf"], "--new-flow-rate", "must be a positive number"),
    # The SYN backlog is never off: its refusal says the default, not "leave it out".
    (["--syn-rate", "0"], "--syn-rate", "(default 4000; a large number lifts it)"),
    (["--syn-rate", "x/s"], "--syn-rate", "is not a number of flows per second"),
    (["--max-udp-flows", "0"], "--max-udp-flows", "must be at least 1"),
    (["--max-icmp-flows", "x"], "--max-icmp-flows", "is not a whole number"),
    (["--new-flow-burst", "0", "--new-flow-rate", "5"], "--new-flow-burst", "at least 1"),
    (["--new-flow-burst", "3"], "--new-flow-burst", "needs --new-flow-rate"),
])
def test_cli_refuses_bad_limits_naming_the_option(args: list[str], option: str,
                                                  says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "relaynat", "run", *args, "--", "true"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert option in done.stderr and says in done.stderr, done.stderr


def test_cli_limits_reach_the_config() -> None:
    from relaynat.cli.options import build_parser, config_from_args

    args = build_parser().parse_args(
        ["run", "--max-tcp-flows", "7", "--max-udp-flows", "8", "--max-icmp-flows", "9",
         "--new-flow-rate", "2.5/s", "--new-flow-burst", "4", "--", "true"])
    config = config_from_args(args)
    assert (config.max_tcp_flows, config.max_udp_flows, config.max_icmp_flows) == (7, 8, 9)
    assert (config.new_flow_rate, config.new_flow_burst) == (2.5, 4)
    legacy = config_from_args(build_parser().parse_args(["run", "--max-flows", "3", "--", "x"]))
    assert legacy.max_tcp_flows == 3 and legacy.new_flow_rate is None


@pytest.mark.parametrize("changes,says", [
    ({"new_flow_rate": 0}, "new_flow_rate must be a positive number"),
    ({"new_flow_rate": -2.0}, "new_flow_rate must be a positive number"),
    ({"new_flow_rate": float("nan")}, "new_flow_rate must be a positive number"),
    ({"new_flow_burst": 4}, "new_flow_burst needs new_flow_rate"),
    ({"new_flow_rate": 1.0, "new_flow_burst": 0}, "new_flow_burst must be a whole number"),
    ({"new_flow_rate": 1.0, "new_flow_burst": 2.5}, "new_flow_burst must be a whole number"),
    ({"max_icmp_flows": 0}, "max_icmp_flows must be at least 1"),
])
def test_config_refuses_bad_limits_naming_the_field(changes: dict, says: str) -> None:  # type: ignore[type-arg]
    from relaynat.config import ConfigError, RelayConfig

    with pytest.raises(ConfigError, match=says):
        RelayConfig().replace(**changes).validate()
