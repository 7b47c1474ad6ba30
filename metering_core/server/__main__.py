"""`python -m metering_core.server > docs/openapi.json`: the service's OpenAPI document."""

import json
import sys

from metering_core.client import AsyncMetering
from metering_core.server import create_app

document = create_app(AsyncMetering("memory"), allow_anonymous=True).openapi()
json.dump(document, sys.stdout, indent=2, sort_keys=True)
sys.stdout.write("\n")
