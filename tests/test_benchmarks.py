"""benchmarks/common.py: a benchmark's run replaces its own section of BENCHMARKS.md."""
from benchmarks.common import replace_section

PAGE = ("# Benchmarks\n\n## At a glance\n\n| goal |\n\n"
        "## a: first\n\nCommand: `M=1 .venv/bin/python -m benchmarks.a`  \nold a\n\n"
        "## a --part z: second\n\nCommand: `.venv/bin/python -m benchmarks.a --part z`  \nold z\n")


def section(run, body):
    return f"\n## {run}\n\nCommand: `.venv/bin/python {run}`  \n{body}\n"


def test_a_benchmarks_run_replaces_the_section_of_its_own_command_and_appends_a_new_one():
    page = replace_section(PAGE, "-m benchmarks.a", section("-m benchmarks.a", "new a"))
    assert "old a" not in page and "new a" in page and "old z" in page and page.count("## ") == PAGE.count("## ")
    assert page.index("new a") < page.index("old z")  # in its place
    page = replace_section(page, "-m benchmarks.a --part z", section("-m benchmarks.a --part z", "new z"))
    assert "old z" not in page and page.count("## ") == PAGE.count("## ")
    page = replace_section(page, "-m benchmarks.b", section("-m benchmarks.b", "new b"))
    assert page.rstrip().endswith("new b") and page.count("## ") == PAGE.count("## ") + 1
    assert page.startswith("# Benchmarks\n\n## At a glance")
