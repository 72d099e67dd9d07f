"""Database URLs with libpq's parameters (as psql and pg_dump read them): each is honoured by both
drivers (SQLAlchemy's asyncpg dialect for the engine, asyncpg for the fast path and the watch
listener) or refused up front naming the parameter, never a driver's TypeError at connect time."""

from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsipam.server.store.db import DSN_PARAMETERS, SESSION_PARAMETERS, parse_database_url, to_sqlalchemy_url

BASE = "postgresql://u:p@db1:5432,db2:5433/ipam"


def test_parameters_go_where_each_driver_reads_them() -> None:
    url = parse_database_url(BASE + "?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=2.5"
                                    "&application_name=ipam-a&options=-c%20statement_timeout%3D5s%20--work_mem%3D4MB"
                                    "&target_session_attrs=read-write")
    assert url.timeout == 2.5
    assert url.server_settings == {"application_name": "ipam-a", "statement_timeout": "5s", "work_mem": "4MB"}
    assert dict(url.dsn_query) == {"sslmode": "verify-full", "sslrootcert": "/ca.pem",
                                   "target_session_attrs": "read-write"}
    dsn = urlsplit(url.asyncpg_dsn())
    assert dict(parse_qsl(dsn.query)) == {"host": "db1,db2", "port": "5432,5433", **dict(url.dsn_query)}
    engine_url = urlsplit(to_sqlalchemy_url(BASE + "?sslmode=require&connect_timeout=3"))
    assert engine_url.scheme == "postgresql+asyncpg"
    assert dict(parse_qsl(engine_url.query)) == {"host": "db1,db2", "port": "5432,5433"}  # the rest: connect args


@pytest.mark.parametrize(("query", "message"), [
    ("bogus=1", "parameter 'bogus' is not supported"),
    ("connect_timeout=soon", "connect_timeout='soon' is not a number of seconds"),
    ("connect_timeout=0", "must be above 0"),
    ("connect_timeout=nan", "must be above 0"),
    ("options=-x", "only '-c name=value' settings"),
    ("options=-c%20novalue", "'novalue' is not name=value"),
])
def test_what_cannot_be_honoured_is_refused_by_name(query: str, message: str) -> None:
    with pytest.raises(ValueError, match="DSIPAM_DATABASE_URL: .*" + message.replace("(", r"\(")):
        parse_database_url(BASE + "?" + query, field="DSIPAM_DATABASE_URL")


_KEYS = st.one_of(st.sampled_from((*DSN_PARAMETERS, *SESSION_PARAMETERS)), st.text(min_size=1, max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_KEYS, st.text(max_size=30)), max_size=6))
def test_any_query_is_parsed_or_refused_naming_a_parameter(pairs: list[tuple[str, str]]) -> None:
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    try:
        url = parse_database_url(BASE + "?" + query, field="DSIPAM_DATABASE_URL")
    except ValueError as exc:
        assert str(exc).startswith("DSIPAM_DATABASE_URL: ")
        assert any(repr(k) in str(exc) or k in str(exc) for k, _ in parse_qsl(query, keep_blank_values=True))
        return
    read = parse_qsl(query, keep_blank_values=True)
    assert {k for k, _ in read} <= {*DSN_PARAMETERS, *SESSION_PARAMETERS}
    assert {k for k, _ in url.dsn_query} == {k for k, _ in read if k in DSN_PARAMETERS}
    assert url.timeout is None or 0 < url.timeout <= 3600
    assert "connect_timeout" not in url.asyncpg_dsn() and "options" not in url.asyncpg_dsn()
