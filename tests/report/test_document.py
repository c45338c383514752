"""One report document, two renderings that say the same thing."""

import base64

import numpy as np
from PIL import Image

from trustseg.report.document import Document


def test_markdown_and_html_carry_the_same_blocks(tmp_path):
    picture = tmp_path / "plot.png"
    Image.fromarray(np.full((4, 6, 3), 200, np.uint8)).save(picture)
    document = (Document("Robustness <of> model").paragraph("two & more").heading("Summary")
                .table(["name", "mIoU"], [["fog", "51.20"]]).image(picture, "the plot"))
    markdown_path, html_path = document.write(tmp_path)
    markdown, page = markdown_path.read_text(), html_path.read_text()
    assert markdown.startswith("# Robustness <of> model")
    assert "| name | mIoU |" in markdown and "| fog | 51.20 |" in markdown
    assert "![the plot](plot.png)" in markdown
    assert "Robustness &lt;of&gt; model" in page and "two &amp; more" in page
    assert "<td>fog</td><td>51.20</td>" in page
    assert base64.b64encode(picture.read_bytes()).decode() in page  # self-contained: the image is embedded
