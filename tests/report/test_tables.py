from rich.console import Console

from trustseg.report.tables import rich_table


def test_terminal_tables_never_cut_a_value_on_a_narrow_terminal():
    names = ["uncalibrated", "ccaffine_argmax", "prune:flops=0.7,importance=magnitude+tome:r=2"]
    header = ["method", *[f"metric number {i}" for i in range(9)]]
    rows = [[name, *[f"{10 * i + 0.123:.2f}" for i in range(9)]] for name in names]
    console = Console(width=80, record=True, color_system=None, soft_wrap=True)  # as the CLI's console
    console.print(rich_table(header, rows, title="calibration"))
    text = console.export_text()
    assert "…" not in text
    lines = text.splitlines()
    for row in rows:
        assert any(all(cell in line for cell in row) for line in lines), f"{row[0]} was cut:\n{text}"
