"""`imagefork submit --wait`'s progress: a bar on a terminal, plain lines anywhere else (no \\r in logs)."""
import io

from streams.console import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(stream) -> str:
    show = progress_bar(stream)
    show("wf", 0, None)
    show("wf", 0, None)
    for done in range(0, 10):
        show("wf", done, 9)
    return stream.getvalue()


def test_off_a_terminal_it_writes_a_line_per_quarter_and_no_carriage_return():
    text = feed(io.StringIO())
    assert "\r" not in text
    assert text.splitlines() == ["wf: waiting for the plan", "wf: 0/9 tasks", "wf: 3/9 tasks", "wf: 5/9 tasks",
                                 "wf: 7/9 tasks", "wf: 9/9 tasks"]


def test_on_a_terminal_it_redraws_one_bar():
    text = feed(Terminal())
    assert "\n" not in text and text.count("\r") == 12
    assert text.endswith("\rwf [" + "#" * 30 + "] 9/9 tasks")
