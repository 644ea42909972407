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

from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any, cast

from django.core.exceptions import ObjectDoesNotExist
from django.db import connection, models
from django.db.models import QuerySet, sql
from django.db.models.signals import post_save, pre_save
from django.db.transaction import mark_for_rollback_on_error


def insert_row(model: type[models.Model], **values: Any) -> None:
    """INSERT one row of ``model``: the given fields, and the defaults of the others."""
    statement, fields, by_name = _insert_statement(connection.vendor, model)
    if pre_save.has_listeners(model) or post_save.has_listeners(model):
        raise TypeError(f"{model.__name__} has save signal receivers: use the ORM")
    unknown = values.keys() - by_name.keys()
    if unknown:
        raise TypeError(f"{model.__name__} has no field(s) {sorted(unknown)}")
    given = {by_name[name].attname: _plain(value) for name, value in values.items()}
    params = [
        field.get_db_prep_save(
            given[field.attname] if field.attname in given else field.get_default(), connection
        )
        for field in fields
    ]
    execute(statement, params)


def update_where(model: type[models.Model], where: dict[str, Any], values: dict[str, Any]) -> int:
    """UPDATE ``model`` SET values WHERE each of ``where`` equals its value (not None);
    the number of rows that matched."""
    if any(value is None for value in where.values()):
        raise TypeError("update_where matches values, not NULL")
    statement, set_fields, where_fields = _update_statement(
        connection.vendor, model, tuple(values), tuple(where)
    )
    params = [
        field.get_db_prep_save(_plain(value), connection)
        for field, value in zip(set_fields, values.values(), strict=True)
    ]
    params += [
        field.get_db_prep_value(_plain(value), connection)
        for field, value in zip(where_fields, where.values(), strict=True)
    ]
    return execute(statement, params)


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
    statement, fields, where_fields = _select_statement(
        connection.vendor, model, names, tuple(where), order_by
    )
    params = [
        field.get_db_prep_value(_plain(value), connection)
        for field, value in zip(where_fields, where.values(), strict=True)
    ]
    with mark_for_rollback_on_error(), connection.cursor() as cursor:
        cursor.execute(statement, params)
        row = cursor.fetchone()
    if row is None:
        return None
    return tuple(_converted(model, field, value) for field, value in zip(fields, row, strict=True))


def _converted(model: type[models.Model], field: models.Field, value: Any) -> Any:
    column = field.get_col(model._meta.db_table)
    # The converters of this thread's connection, in the compiler's order (JSON text to a
    # dict, SQLite's datetime text to a datetime).
    for convert in connection.ops.get_db_converters(column) + field.get_db_converters(connection):
        value = convert(value, column, connection)
    return value


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
    # As the ORM's writes: a failure inside atomic() marks it for rollback even if caught.
    with mark_for_rollback_on_error(), connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount


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
