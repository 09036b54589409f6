"""report.html's wording, where it is built from run data."""

from cytoray.curation.report import reason_counts


def test_duplicates_heading_counts_reasons_in_words_not_a_python_dict():
    """The Duplicates section opened with ``{'near': 38, 'exact': 8}`` (issue 31)."""
    assert reason_counts({"exact": 8, "near": 38, "leakage": 1}) == "38 near, 8 exact, 1 leakage"
    assert reason_counts({}) == "none"
    assert reason_counts({"<b>": 2}) == "2 &lt;b&gt;"  # escaped: the page is HTML
