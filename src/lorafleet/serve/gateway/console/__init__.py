"""The web console: a page served at /ui beside the API (`lorafleet serve`) or alone (`lorafleet
console`), with the fleet, its runs, the playground, serving, tenants and keys, and the audit log.

app.py holds the routes; the other modules each compute one page's facts; static/ is the page, its
script, its style and the chart library it ships (uPlot, vendored: nothing is fetched elsewhere).
"""
