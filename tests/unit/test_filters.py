"""containerd filter syntax: parsing, matching, errors, and the adaptors."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import any_pb2

from pycontainerd import filters, typeurl
from pycontainerd.api.events import container_pb2, task_pb2
from pycontainerd.errdefs import InvalidArgument

# The corpus of containerd's filters/filter_test.go, seen through field_adaptor.
CORPUS: list[dict[str, Any]] = [
    {"name": "foo", "labels": {"foo": "true"}},
    {"name": "bar"},
    {"name": "foo", "labels": {"foo": "present", "more complex label": "present"}},
    {"name": "bar", "labels": {"bar": "true"}},
    {"name": "fooer", "labels": {'more complex label with \\ and "': "present"}},
    {"name": "fooer", "labels": {'more complex label with \\ and ".post': "present"}},
    {"name": "baz", "other": "too complex, yo"},
    {"name": "bazo", "other": "abc"},
    {"name": "compound", "labels": {"foo": "omg_asdf.asdf-qwer"}},
]


def matching(flt: list[str]) -> list[int]:
    f = filters.parse(flt)
    return [i for i, obj in enumerate(CORPUS) if f.match(filters.field_adaptor(obj))]


ALL = list(range(len(CORPUS)))


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ([], ALL),
        ([""], ALL),
        (["name==nothing", ""], ALL),  # "" in the list makes the OR always true
        (["name"], ALL),
        (["labels.foo"], [0, 2, 8]),
        (["labels.foo,name"], [0, 2, 8]),
        (["labels.foo==true"], [0]),
        (["labels.foo==omg_asdf.asdf-qwer"], [8]),
        (["name==bar"], [1, 3]),
        (["name!=bar"], [0, 2, 4, 5, 6, 7, 8]),
        (["name==bar,labels.bar"], [3]),
        (['other=="too complex, yo"'], [6]),
        (["other~=[abc]+,name!=foo"], [6, 7]),
        (["other~=/[abc]+/,name!=foo"], [6, 7]),
        (["other~=|[abc]{1,2}|,name!=foo"], [6, 7]),
        (['other~=/[abc]{0,1}"\\//,name!=foo'], []),
        (["name==bar,labels.bar==true"], [3]),
        (["name==bar,labels.bar==wrong"], []),
        (['name==foo,labels."more complex label"'], [2]),
        (['labels."more complex label with \\\\ and \\""==present'], [4]),
        (['labels."more complex label with \\\\ and \\"".post==present'], [5]),
        (["name==foo", "name==bar"], [0, 1, 2, 3]),  # list entries are OR'ed
        (["name == bar"], [1, 3]),  # spaces around the operator
        (["name==foo, labels.foo==true"], [0]),
        (["missing!=x"], ALL),  # != is true for an absent field
        (["missing~=^$"], ALL),  # ~= searches "" for an absent field
        (["missing==''"], []),
        (["name~=^ba"], [1, 3, 6, 7]),
        (["name~=o$"], [0, 2, 7]),
        (['name=="\\x66oo"'], [0, 2]),
        (['name=="\\u0066oo"'], [0, 2]),
        (['name=="\\146oo"'], [0, 2]),
    ],
)
def test_match_table(flt: list[str], expected: list[int]) -> None:
    assert matching(flt) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "labels.|foo|==omg_asdf.asdf-qwer",
            "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote",
        ),
        (
            'labels.?"more complex label with \\\\ and \\"".post==present',
            "filters: parse error: [labels. >|?|< ",
        ),
        ("name==foo,", "filters: parse error: [name==foo,]: expected field or quoted"),
        ("labels.", "filters: parse error: [labels.]: expected field or quoted"),
        ("image~=,id?=?fbaq", "[image~= >|,|< id?=?fbaq]: expected value or quoted"),
        ("labels.ns/key==value", "[labels.ns >|/|< key==value]: quoted literal not terminated"),
        ("labels.key==/value", "[labels.key== >|/|< value]: quoted literal not terminated"),
        ("name=bar", "unsupported operator '='"),
        ("name===bar", "unsupported operator '==='"),
        ("name==", "expected value or quoted"),
        ("name bar", "expected an operator"),
        ("name==bar baz", "unexpected input"),
        ("topic==/tasks/exit/", "invalid quote encountered"),
        ('name=="a\\qb"', "illegal escape sequence"),
        ('name=="\\x4"', "illegal hexadecimal escape"),
        ('name=="open', "quoted literal not terminated"),
        ("name~=[unclosed", "invalid regular expression"),
        (",name", "expected field or quoted"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        filters.parse([text])
    assert message in str(err.value)
    assert str(err.value).endswith(": invalid argument")


def test_one_bad_string_fails_the_list() -> None:
    with pytest.raises(InvalidArgument):
        filters.parse(["name==a", "name=b"])


def test_bare_string_is_one_filter() -> None:
    f = filters.parse("name==foo,labels.foo")
    assert len(f.clauses) == 1
    assert len(f.clauses[0]) == 2


def test_always() -> None:
    assert filters.parse([]).always
    assert filters.parse(["a", ""]).always
    assert not filters.parse(["a"]).always
    assert filters.ALWAYS.match(lambda path: ("", False))


def test_field_adaptor_kinds() -> None:
    adapt = filters.field_adaptor(
        {
            "name": "",
            "flag": False,
            "count": 3,
            "labels": {"a.b": "1", "empty": ""},
            "nested": {"inner": {"k": "v"}},
            "custom": lambda path: ("/".join(path), True),
        }
    )
    assert adapt(["name"]) == ("", False)  # an empty string field is absent
    assert adapt(["flag"]) == ("false", True)
    assert adapt(["count"]) == ("3", True)
    assert adapt(["labels", "a", "b"]) == ("1", True)  # joined with "."
    assert adapt(["labels", "a.b"]) == ("1", True)
    assert adapt(["labels", "empty"]) == ("", True)  # an empty label is still present
    assert adapt(["labels", "zzz"]) == ("", False)
    assert adapt(["labels"]) == ("", False)
    assert adapt(["nested", "inner", "k"]) == ("v", True)
    assert adapt(["custom", "x", "y"]) == ("x/y", True)
    assert adapt(["name", "sub"]) == ("", False)
    assert adapt([]) == ("", False)
    assert adapt(["nope"]) == ("", False)


def test_message_adaptor_follows_containerd_field_methods() -> None:
    create = container_pb2.ContainerCreate(
        id="c1",
        image="docker.io/library/busybox:latest",
        runtime=container_pb2.ContainerCreate.Runtime(name="io.containerd.runc.v2"),
    )
    adapt = filters.message_adaptor(create)
    assert adapt(["id"]) == ("c1", True)
    assert adapt(["runtime", "name"]) == ("io.containerd.runc.v2", True)
    assert adapt(["runtime", "options", "x"]) == ("", False)  # unset Any
    assert adapt(["runtime"]) == ("", False)
    assert adapt(["nope"]) == ("", False)

    update = container_pb2.ContainerUpdate(id="c1", labels={"io.x/y": "z", "a.b": "c"})
    adapt = filters.message_adaptor(update)
    assert adapt(["labels", "io.x/y"]) == ("z", True)
    assert adapt(["labels", "a", "b"]) == ("c", True)
    assert adapt(["labels", "other"]) == ("", False)
    assert adapt(["snapshot_key"]) == ("", False)

    exit_ = task_pb2.TaskExit(container_id="c1", pid=7, exit_status=0)
    adapt = filters.message_adaptor(exit_)
    # Numbers and timestamps are "unhandled" in containerd's generated Field methods.
    assert adapt(["pid"]) == ("", False)
    assert adapt(["exited_at"]) == ("", False)
    assert adapt(["container_id"]) == ("c1", True)

    # A message nested in an Any is unpacked (the Any field is named options here).
    wrapped = container_pb2.ContainerCreate(
        runtime=container_pb2.ContainerCreate.Runtime(
            name="r", options=typeurl.pack(task_pb2.TaskStart(container_id="inner"))
        )
    )
    adapt = filters.message_adaptor(wrapped)
    assert adapt(["runtime", "options", "container_id"]) == ("inner", True)
    unknown = container_pb2.ContainerCreate(
        runtime=container_pb2.ContainerCreate.Runtime(
            options=any_pb2.Any(type_url="example.com/Unknown", value=b"")
        )
    )
    assert filters.message_adaptor(unknown)(["runtime", "options", "x"]) == ("", False)


def test_filter_on_message_fields() -> None:
    f = filters.parse(['container_id==c1,labels."io.x/y"~=^z'])
    ok = container_pb2.ContainerUpdate(id="c1", labels={"io.x/y": "zz"})
    # ContainerUpdate has no container_id: absent, so == fails.
    assert not f.match(filters.message_adaptor(ok))
    f = filters.parse(['id==c1,labels."io.x/y"~=^z'])
    assert f.match(filters.message_adaptor(ok))
    assert not f.match(filters.message_adaptor(container_pb2.ContainerUpdate(id="c1")))
