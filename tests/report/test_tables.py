def test_terminal_tables_never_cut_the_names_in_the_first_column():
    from rich.console import Console

    from trustseg.report.tables import rich_table

    names = ["uncalibrated", "ccaffine_argmax", "dirichlet", "ibts_ti"]
    header = ["method", *[f"metric {i}" for i in range(9)]]
    rows = [[name, *[f"{10 * i + 0.123:.2f}" for i in range(9)]] for name in names]
    console = Console(width=80, record=True, color_system=None)
    console.print(rich_table(header, rows, title="calibration"))
    lines = console.export_text().splitlines()
    for name in names:
        assert any(name in line for line in lines), f"{name} was cut:\n" + "\n".join(lines)
