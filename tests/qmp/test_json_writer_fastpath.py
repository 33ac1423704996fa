"""The writer's json.dumps fast path must produce exactly QEMU's escapes."""

from hypothesis import given, settings
from hypothesis import strategies as st

from sevmon.qmp import json_writer


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), min_size=257, max_size=600))
def test_fast_path_equals_qemu_escaping(s):
    slow = '"' + json_writer._NEEDS_ESCAPE.sub(json_writer._escape_char, s) + '"'
    assert json_writer.to_qemu_json(s) == slow


def test_hmp_sized_reply_takes_the_fast_path_and_is_ascii():
    text = "0000000000400000: 000000000b2a8000 X---A--U-\r\n" * 10000
    out = json_writer.to_qemu_json({"return": text, "id": "__qmp#00001"})
    assert out.isascii() and out.count("\\r\\n") == 10000
