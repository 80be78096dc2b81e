"""Generate the binary documents of the sample corpus (dev-only).

The PDF and DOCX files are kept in the tree; rerun this script only to change
their content:

    python samples/make_documents.py

Needs fpdf2 and python-docx. The PDF uses a core font, so its text must stay
within Latin-1 (no euro sign, no typographic dashes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from docx import Document
from fpdf import FPDF

CORPUS = Path(__file__).resolve().parent / "corpus"
ISSUED = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)

# --- product/atlas-user-guide.pdf: public within the tenant -------------------

GUIDE_TITLE = "Contoso Atlas 3.8 User Guide"
GUIDE_PAGES: list[tuple[str, list[str]]] = [
    (
        "1. Getting started",
        [
            "Contoso Atlas is the analytics workspace for operations teams. This guide covers "
            "version 3.8 and explains how to create a workspace, connect data, build dashboards "
            "and set up alerts. Administrators should also read the Atlas Administration Guide.",
            "To sign in, open your Atlas tenant address in a browser and choose your company "
            "sign-in. Atlas uses your organisation's single sign-on, so there is no separate "
            "Atlas password. The first person to sign in to a new tenant becomes its owner.",
            "A workspace groups the data sources, dashboards and alerts of one team. Create one "
            "from the home page with New workspace, give it a name and choose who may edit it. "
            "Viewers can see dashboards but cannot change them; editors can build dashboards and "
            "alerts; owners can also manage data sources and membership.",
            "Press Ctrl+K anywhere in Atlas to open the command palette. From the palette you can "
            "jump to any dashboard, data source or setting by typing part of its name, which is "
            "much faster than the menus once a workspace has grown.",
        ],
    ),
    (
        "2. Connecting data",
        [
            "Open Data sources in the workspace menu and choose Add source. Pick a connector, "
            "enter the connection details and test the connection before saving. Credentials "
            "are stored encrypted and are never shown again after saving; to change them, "
            "replace them.",
            "Atlas Sync copies the tables you select into the workspace on a schedule. The "
            "default schedule is every 15 minutes. A sync that fails three times in a row pauses "
            "itself and notifies the workspace owners, so a broken source does not hammer your "
            "database with retries.",
            "Large tables can be synced incrementally. Choose a column that only ever increases, "
            "such as an update timestamp or an identity column, as the watermark. Atlas then "
            "copies only rows newer than the last watermark it saw. Incremental sync reduces load "
            "on the source by an order of magnitude for append-mostly tables.",
            "Shared data sets let several workspaces use one synced source. Define the data set "
            "once in a hub workspace, then publish it; other workspaces subscribe to it without "
            "storing another copy.",
        ],
    ),
    (
        "3. Dashboards and tiles",
        [
            "A dashboard is a grid of tiles. Each tile shows one query as a chart, a number, a "
            "table or a map. Drag tiles to arrange them and drag their corners to resize them. "
            "Dashboards save automatically, and every saved version can be restored from the "
            "History panel for the retention period of the workspace.",
            "Filters at the top of a dashboard apply to every tile that uses the filtered field. "
            "Pin a filter value to make it the default for everyone, or keep it personal. "
            "Dashboard links carry the current filter values, so a link you share opens exactly "
            "the view you were looking at.",
            "Tiles refresh when their data source syncs. To refresh a single tile now, choose "
            "Refresh from its menu; this does not trigger a sync, it reruns the tile's query on "
            "the data already in the workspace.",
        ],
    ),
    (
        "4. Alerts",
        [
            "Any numeric tile can have an alert. Choose Add alert from the tile menu and pick a "
            "rule: above a threshold, below a threshold, or anomaly. An anomaly alert learns the "
            "normal range of the metric from the last 28 days and fires when a value is more than "
            "3 standard deviations from the expected value.",
            "Alerts notify by email, Microsoft Teams, Slack or webhook. Each alert can notify "
            "several channels, and each channel can be muted for the night. A firing alert can be "
            "snoozed for up to 72 hours; after that it fires again if the condition still holds.",
            "Every alert keeps a history of when it fired, who acknowledged it and what the value "
            "was. Use the history to tune thresholds: an alert that fires every day and is always "
            "ignored is worse than no alert at all.",
            "For help, open the help centre from the question mark in the top bar, or ask your "
            "Atlas administrator.",
        ],
    ),
]


def make_user_guide(path: Path) -> None:
    pdf = FPDF(format="A4")
    pdf.set_title(GUIDE_TITLE)
    pdf.set_author("Contoso Product Documentation")
    pdf.set_creation_date(ISSUED)
    pdf.set_margins(20, 20, 20)
    for heading, paragraphs in GUIDE_PAGES:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 10)
        pdf.cell(0, 6, GUIDE_TITLE, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "B", 16)
        pdf.cell(0, 12, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 11)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 6, paragraph, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    pdf.output(str(path))


# --- finance/project-falcon-budget-memo.docx: finance and the CEO only --------

MEMO_TITLE = "Project Falcon: FY2026 Budget Approval"
MEMO_HEADER = [
    "To: Megan Bowen, Chief Executive Officer",
    "From: Lynne Robbins, Chief Financial Officer",
    "Date: 3 March 2025",
    "Classification: CONFIDENTIAL - Finance and Executive only",
]
MEMO_SECTIONS: list[tuple[str, list[str]]] = [
    (
        "Summary",
        [
            "This memo asks for approval of the FY2026 budget for Project Falcon, the programme "
            "to launch Contoso Atlas in the Japanese and South Korean markets. Finance recommends "
            "a total budget of USD 4.85 million for FY2026, booked to cost centre CC-4471, with a "
            "further contingency of USD 350,000 held centrally and released only by the CFO.",
            "The programme was reviewed by the investment committee on 24 February 2025. The "
            "committee supported it on the condition that spending is released in two tranches, "
            "with the second tranche tied to the first enterprise contract signed in the region.",
        ],
    ),
    (
        "Budget breakdown",
        [
            "The budget covers the first full year of operations. Personnel is the largest line: "
            "Project Falcon plans a headcount of 14 by the end of FY2026, of whom 9 are in sales "
            "and customer success based in Tokyo and Seoul.",
        ],
    ),
    (
        "Financial case",
        [
            "On the base case, Project Falcon reaches annual recurring revenue of USD 6.2 million "
            "by the end of FY2027 and breaks even in Q3 FY2027. The downside case, with the "
            "enterprise pipeline converting at half the expected rate, delays break-even to Q2 "
            "FY2028 and would require an additional USD 1.1 million in FY2027.",
            "Gross margin on Atlas subscriptions in the region is expected to be 71%, slightly "
            "below the group average because of the local data-residency hosting costs.",
        ],
    ),
    (
        "Risks",
        [
            "The main risks are slower enterprise sales cycles than in Europe, the cost of "
            "meeting local data-residency rules, and competition from a well-funded local "
            "analytics vendor. Currency exposure to the yen is hedged for 80% of FY2026 "
            "personnel costs.",
            "The name Project Falcon and these figures are not public. Do not share this memo "
            "outside Finance and the executive team; the launch will be announced by "
            "Communications once the first customer has signed.",
        ],
    ),
    (
        "Decision requested",
        [
            "Please approve the FY2026 Project Falcon budget of USD 4.85 million and the "
            "two-tranche release. On approval, Finance will open cost centre CC-4471 and release "
            "the first tranche of USD 2.6 million on 1 April 2025.",
        ],
    ),
]
MEMO_TABLE = [
    ("Line", "FY2026 (USD)"),
    ("Personnel (14 FTE)", "2,310,000"),
    ("Cloud hosting, Japan East and Korea Central", "780,000"),
    ("Localisation and compliance", "540,000"),
    ("Marketing and launch events", "720,000"),
    ("Partner enablement", "500,000"),
    ("Total", "4,850,000"),
]


def make_finance_memo(path: Path) -> None:
    document = Document()
    properties = document.core_properties
    properties.title = MEMO_TITLE
    properties.author = "Lynne Robbins"
    properties.created = ISSUED
    properties.modified = ISSUED
    document.add_paragraph(MEMO_TITLE, style="Title")
    for line in MEMO_HEADER:
        document.add_paragraph(line)
    for heading, paragraphs in MEMO_SECTIONS:
        document.add_heading(heading, level=1)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
        if heading == "Budget breakdown":
            table = document.add_table(rows=0, cols=2)
            table.style = "Table Grid"
            for label, amount in MEMO_TABLE:
                cells = table.add_row().cells
                cells[0].text = label
                cells[1].text = amount
    document.save(str(path))


def main() -> None:
    make_user_guide(CORPUS / "product" / "atlas-user-guide.pdf")
    make_finance_memo(CORPUS / "finance" / "project-falcon-budget-memo.docx")


if __name__ == "__main__":
    main()
