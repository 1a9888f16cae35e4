"""Plain-text tables for the command line (the main job, the export report)."""


def text_table(header, rows):
    """Columns padded to their widest cell, ` | ` between cells, a rule under the header."""
    lines = [tuple(header)] + [tuple(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)
