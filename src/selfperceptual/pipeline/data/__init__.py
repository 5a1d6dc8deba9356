"""The data stages' formats and helpers."""

# Above this share of URLs not fetched, the download warns and the report says so: LAION's links
# decay by some tens of percent; more suggests the network or a proxy, and a shrunken training set.
DEAD_URL_WARNING = 0.3
