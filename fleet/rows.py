"""Statements the hot paths repeat, with their SQL built once instead of by the ORM each time.

A station's migration writes ~10 history rows, ~5 exchange rows and ~10 conditional updates,
and reads a few single values and boot records; ingestion writes back every station an event
batch touched. Through the ORM each statement builds its query anew (model instance,
compiler, SQL): on this machine 0.4-0.6 ms of CPU a statement, against ~0.05 ms to convert
the values and execute (benchmarks/README.md, issue 9). These build each statement once per
database vendor, model and set of fields, quoted by the backend and with the fields' own
conversions.

They take fields by name or attname (``migration`` or ``migration_id``) and plain values;
an expression (``F``, ``Case``) or a model instance where a column value belongs is refused.
A statement with expressions is compiled once with compiled_update. No signals are sent and
no ``pre_save`` runs (``auto_now``): a model that needs them is refused by insert_row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from typing import Any, cast

from django.core.exceptions import ObjectDoesNotExist
from django.db import DEFAULT_DB_ALIAS, connection, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import QuerySet, sql
from django.db.models.signals import post_save, pre_save
from django.db.transaction import mark_for_rollback_on_error


def insert_row(model: type[models.Model], **values: Any) -> None:
    """INSERT one row of ``model``: the given fields, and the defaults of the others."""
    db = _db()
    statement, fields, by_name = _insert_statement(db.vendor, model)
    if pre_save.has_listeners(model) or post_save.has_listeners(model):
        raise TypeError(f"{model.__name__} has save signal receivers: use the ORM")
    unknown = values.keys() - by_name.keys()
    if unknown:
        raise TypeError(f"{model.__name__} has no field(s) {sorted(unknown)}")
    given = {by_name[name].attname: _plain(value) for name, value in values.items()}
    params = [
        _for_save(
            db, field, given[field.attname] if field.attname in given else field.get_default()
        )
        for field in fields
    ]
    _run(db, statement, params, fetch=False)


def update_where(model: type[models.Model], where: dict[str, Any], values: dict[str, Any]) -> int:
    """UPDATE ``model`` SET values WHERE each of ``where`` equals its value (not None);
    the number of rows that matched."""
    if any(value is None for value in where.values()):
        raise TypeError("update_where matches values, not NULL")
    db = _db()
    statement, set_fields, where_fields = _update_statement(
        db.vendor, model, tuple(values), tuple(where)
    )
    params = [
        _for_save(db, field, _plain(value))
        for field, value in zip(set_fields, values.values(), strict=True)
    ]
    params += [
        _for_match(db, field, _plain(value))
        for field, value in zip(where_fields, where.values(), strict=True)
    ]
    rowcount, _ = _run(db, statement, params, fetch=False)
    return rowcount


def update_each(
    model: type[models.Model], names: Sequence[str], rows: Iterable[models.Model]
) -> None:
    """Write those fields of each instance back to its row (one prepared UPDATE, run for
    every row: bulk_update would build a CASE over all the rows for every field)."""
    pk = model._meta.pk.attname
    statement, fields, _ = _update_statement(connection.vendor, model, tuple(names), (pk,))
    params = [
        [field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields]
        + [row.pk]
        for row in rows
    ]
    with mark_for_rollback_on_error(), connection.cursor() as cursor:
        cursor.executemany(statement, params)


def select_value(model: type[models.Model], name: str, pk: Any) -> Any:
    """One field of one row, converted as the ORM converts it (ObjectDoesNotExist: no
    such row)."""
    row = select_first(model, (name,), {model._meta.pk.attname: pk})
    if row is None:
        raise ObjectDoesNotExist(f"no {model.__name__} with pk {pk}")
    return row[0]


def select_first(
    model: type[models.Model],
    names: tuple[str, ...],
    where: dict[str, Any],
    order_by: str = "",
) -> tuple[Any, ...] | None:
    """Those fields of the first row where each of ``where`` equals its value (not None),
    in ``order_by``'s order (a field name, "-" for descending), converted as the ORM
    converts them; None when no row matches."""
    if any(value is None for value in where.values()):
        raise TypeError("select_first matches values, not NULL")
    db = _db()
    statement, fields, where_fields = _select_statement(
        db.vendor, model, names, tuple(where), order_by
    )
    params = [
        _for_match(db, field, _plain(value))
        for field, value in zip(where_fields, where.values(), strict=True)
    ]
    _, row = _run(db, statement, params, fetch=True)
    if row is None:
        return None
    return tuple(
        _converted(db, model, field, value) for field, value in zip(fields, row, strict=True)
    )


def _converted(
    db: BaseDatabaseWrapper, model: type[models.Model], field: models.Field, value: Any
) -> Any:
    column = _column_of(model, field)
    # The converters of this thread's connection, in the compiler's order (JSON text to a
    # dict, SQLite's datetime text to a datetime).
    for convert in db.ops.get_db_converters(column) + field.get_db_converters(db):
        value = convert(value, column, db)
    return value


@cache
def _column_of(model: type[models.Model], field: models.Field) -> Any:
    return field.get_col(model._meta.db_table)


def compiled_update(
    queryset: QuerySet[Any], changes: dict[str, Any]
) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters ``queryset.update(**changes)`` would run (SET's parameters,
    then WHERE's), for a statement with expressions that is worth compiling once."""
    query = cast(sql.UpdateQuery, queryset.query.chain(sql.UpdateQuery))
    query.add_update_values(changes)
    statement, params = query.get_compiler(connection=connection).as_sql()
    return statement, tuple(params)


def execute(statement: str, params: Sequence[Any]) -> int:
    """Run a statement built here (or by compiled_update); the rows it matched."""
    rowcount, _ = _run(_db(), statement, params, fetch=False)
    return rowcount


def _db() -> BaseDatabaseWrapper:
    # Looked up once a statement: each attribute read through django.db.connection looks
    # the thread's connection up again (~3 us, as much as sqlite3 takes for a read).
    return connections[DEFAULT_DB_ALIAS]


def _run(
    db: BaseDatabaseWrapper, statement: str, params: Sequence[Any], *, fetch: bool
) -> tuple[int, Any]:
    """Execute on the driver's own cursor, with what Django's cursor does around it (the
    health check, the connection, the broken-transaction check, its exception classes),
    but not its wrappers: a new wrapper, the parameter style's conversion and three layers
    of calls were half of such a statement's CPU (benchmarks/README.md, issue 9).

    Not in DEBUG's ``connection.queries``; a block that captures or wraps queries
    (CaptureQueriesContext, ``execute_wrapper``) gets Django's cursor and sees them."""
    # As the ORM's writes: a failure inside atomic() marks it for rollback even if caught.
    with mark_for_rollback_on_error(db.alias):
        if db.force_debug_cursor or db.execute_wrappers:
            with db.cursor() as cursor:
                cursor.execute(statement, params)
                return cursor.rowcount, cursor.fetchone() if fetch else None
        db.close_if_health_check_failed()
        db.ensure_connection()
        db.validate_thread_sharing()
        db.validate_no_broken_transaction()
        with db.wrap_database_errors:
            cursor = db.connection.cursor()
            try:
                cursor.execute(_native(db.vendor, statement), params)
                return cursor.rowcount, cursor.fetchone() if fetch else None
            finally:
                cursor.close()


@lru_cache(maxsize=1024)
def _native(vendor: str, statement: str) -> str:
    """The statement in the driver's parameter style (sqlite3's ``?``; psycopg's is ours)."""
    if vendor == "sqlite":
        return re.sub(r"(?<!%)%s", "?", statement).replace("%%", "%")
    return statement


# Fields (these classes exactly: a subclass may convert) whose own conversion
# (get_db_prep_save/_value) returns a value of that Python type unchanged: it is skipped.
# Integers only on SQLite: Django's psycopg backend wraps them in sized types (Int4, ...).
_AS_IS: dict[type[models.Field], type] = {
    models.CharField: str,
    models.TextField: str,
    models.AutoField: int,
    models.BigAutoField: int,
    models.SmallAutoField: int,
    models.IntegerField: int,
    models.BigIntegerField: int,
    models.SmallIntegerField: int,
    models.PositiveIntegerField: int,
    models.PositiveBigIntegerField: int,
    models.PositiveSmallIntegerField: int,
    models.FloatField: float,
    models.BooleanField: bool,
}


@cache
def _stored_as(vendor: str, field: models.Field) -> type | None:
    target = field.target_field if isinstance(field, models.ForeignKey) else field
    kind = _AS_IS.get(type(target))
    return None if kind is int and vendor != "sqlite" else kind


def _as_is(db: BaseDatabaseWrapper, field: models.Field, value: Any) -> bool:
    kind = _stored_as(db.vendor, field)
    if kind is None:
        return False
    # An int is not a bool's field's value, nor a bool an int's (bool subclasses int).
    return value is None or (isinstance(value, str) if kind is str else type(value) is kind)


def _for_save(db: BaseDatabaseWrapper, field: models.Field, value: Any) -> Any:
    return value if _as_is(db, field, value) else field.get_db_prep_save(value, db)


def _for_match(db: BaseDatabaseWrapper, field: models.Field, value: Any) -> Any:
    return value if _as_is(db, field, value) else field.get_db_prep_value(value, db)


def _plain(value: Any) -> Any:
    if hasattr(value, "resolve_expression") or isinstance(value, models.Model):
        raise TypeError(f"a plain value is needed, not {value!r}")
    return value


def _field(model: type[models.Model], name: str) -> models.Field:
    """A field stored in a column, by name or attname."""
    for field in model._meta.concrete_fields:
        if name in (field.name, field.attname):
            return field
    raise TypeError(f"{model.__name__} has no field {name!r} stored in a column")


def _column(field: models.Field) -> str:
    assert field.column is not None, f"{field} has no column"  # concrete fields all have one
    return field.column


# The SQL is the vendor's: the vendor is in each cache key.


@cache
def _insert_statement(
    vendor: str, model: type[models.Model]
) -> tuple[str, list[models.Field], dict[str, models.Field]]:
    fields = [field for field in model._meta.concrete_fields if not field.primary_key]
    if any(getattr(field, "auto_now", False) or field.generated for field in fields):
        raise TypeError(f"{model.__name__} has fields the ORM fills in on save: use the ORM")
    query = sql.InsertQuery(model)
    query.insert_values(fields, [model()])
    [(statement, _)] = query.get_compiler(connection=connection).as_sql()
    by_name = {field.name: field for field in fields} | {field.attname: field for field in fields}
    return statement, fields, by_name


@cache
def _update_statement(
    vendor: str, model: type[models.Model], set_names: tuple[str, ...], where_names: tuple[str, ...]
) -> tuple[str, list[models.Field], list[models.Field]]:
    quote = connection.ops.quote_name
    set_fields = [_field(model, name) for name in set_names]
    where_fields = [_field(model, name) for name in where_names]
    assignments = ", ".join(f"{quote(_column(field))} = %s" for field in set_fields)
    conditions = " AND ".join(f"{quote(_column(field))} = %s" for field in where_fields)
    statement = f"UPDATE {quote(model._meta.db_table)} SET {assignments} WHERE {conditions}"
    return statement, set_fields, where_fields


@cache
def _select_statement(
    vendor: str,
    model: type[models.Model],
    names: tuple[str, ...],
    where_names: tuple[str, ...],
    order_by: str,
) -> tuple[str, list[models.Field], list[models.Field]]:
    quote = connection.ops.quote_name
    fields = [_field(model, name) for name in names]
    where_fields = [_field(model, name) for name in where_names]
    columns = ", ".join(quote(_column(field)) for field in fields)
    conditions = " AND ".join(f"{quote(_column(field))} = %s" for field in where_fields)
    statement = f"SELECT {columns} FROM {quote(model._meta.db_table)} WHERE {conditions}"
    if order_by:
        descending = order_by.startswith("-")
        order_field = _field(model, order_by.removeprefix("-"))
        statement += f" ORDER BY {quote(_column(order_field))}{' DESC' if descending else ''}"
    return statement + " LIMIT 1", fields, where_fields
