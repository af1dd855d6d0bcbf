"""'edgefleet users': the first admin from the admin token, roles, API tokens for the CLI."""

from __future__ import annotations

import re

from click.testing import Result
from fastapi.testclient import TestClient

from tests.fleet.cli_support import EDGEFLEET, cli, ok, runner

PASSWORD = "correct horse battery staple"


def with_stdin(http: TestClient, text: str, *args: str, token: str) -> Result:
    return runner.invoke(
        EDGEFLEET,
        [*args, "--token", token],
        input=text,
        obj={"http": http},
        catch_exceptions=False,
    )


def test_the_first_admin_is_made_with_the_admin_token(http: TestClient) -> None:
    from tests.fleet.helpers import ADMIN_TOKEN

    result = with_stdin(
        http, f"{PASSWORD}\n", "users", "create", "ada", "--admin", "--password-stdin",
        token=ADMIN_TOKEN,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "created ada: admin" in result.output
    assert "/ui/" in result.output
    listed = ok(http, "users", "list")
    assert re.search(r"ada\s+admin\s+active", listed), listed


def test_a_short_password_is_refused_and_nothing_is_made(http: TestClient) -> None:
    from tests.fleet.helpers import ADMIN_TOKEN

    result = with_stdin(
        http, "short\n", "users", "create", "bob", "--password-stdin", token=ADMIN_TOKEN
    )
    assert result.exit_code == 1
    assert "at least 12 characters" in result.output
    assert "bob" not in ok(http, "users", "list")


def test_a_users_api_token_drives_the_cli_with_their_role(http: TestClient) -> None:
    from tests.fleet.helpers import ADMIN_TOKEN

    made = with_stdin(
        http, f"{PASSWORD}\n", "users", "create", "vera", "--role", "viewer", "--password-stdin",
        token=ADMIN_TOKEN,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    created = ok(http, "users", "token", "create", "--name", "laptop", "--user", "vera")
    secret = re.search(r"secret \(shown only now\): (\S+)", created)
    assert secret is not None, created
    token = secret.group(1)
    assert cli(http, "groups", "list", token=token).exit_code == 0
    refused = cli(http, "groups", "create", "lab", token=token)
    assert refused.exit_code == 1
    assert "viewer" in refused.output
    assert "operator role" in refused.output
    listed = cli(http, "users", "token", "list", token=token)
    assert "laptop" in listed.output
    token_id = re.search(r"^\s*(\d+)\s+vera", listed.output, re.MULTILINE)
    assert token_id is not None, listed.output
    assert cli(http, "users", "token", "revoke", token_id.group(1), token=token).exit_code == 0
    assert cli(http, "groups", "list", token=token).exit_code == 1


def test_set_changes_a_role_and_refuses_to_drop_the_last_admin(http: TestClient) -> None:
    from tests.fleet.helpers import ADMIN_TOKEN

    for name, role in (("ada", "admin"), ("oscar", "viewer")):
        result = with_stdin(
            http, f"{PASSWORD}\n", "users", "create", name, "--role", role, "--password-stdin",
            token=ADMIN_TOKEN,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    assert "oscar: operator" in ok(http, "users", "set", "oscar", "--role", "operator")
    last = cli(http, "users", "set", "ada", "--disable")
    assert last.exit_code == 1
    assert "last enabled admin" in last.output
    assert cli(http, "users", "set", "ada").exit_code == 1  # nothing to change
