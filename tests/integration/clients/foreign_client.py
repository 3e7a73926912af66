"""A client that is not p2ptrain: the standard library only, following docs/wire.md.

Run with ``python -I -S`` (no site-packages), so nothing of the project or its dependencies can help.
Usage: foreign_client.py URL binary|structured KEY_FILE TYPE SOURCE CONTENT_TYPE DATA_FILE [name=value ...]
Prints the HTTP status and the x-p2ptrain-reason header.
"""

import base64
import hashlib
import hmac
import json
import sys
import urllib.error
import urllib.request
import uuid


def canonical(attributes, data):
    lines = [f"{name}={value}" for name, value in sorted(attributes.items()) if name not in ("signature", "time")]
    return "\n".join([*lines, hashlib.sha256(data).hexdigest()])


def main():
    url, mode, key_file, event_type, source, content_type, data_file, *extensions = sys.argv[1:]
    with open(key_file, "rb") as f:
        key = f.read().strip()
    with open(data_file, "rb") as f:
        data = f.read()
    attributes = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": source, "type": event_type,
                  "datacontenttype": content_type}
    attributes.update(pair.split("=", 1) for pair in extensions)
    attributes["signature"] = hmac.new(key, canonical(attributes, data).encode(), hashlib.sha256).hexdigest()
    if mode == "binary":
        headers = {"content-type": content_type}
        headers.update({f"ce-{name}": value for name, value in attributes.items() if name != "datacontenttype"})
        body = data
    elif content_type.endswith("json"):
        # The JSON text is inserted as it is: the signature covers exactly these bytes.
        fields = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in attributes.items())
        body = ("{" + fields + ', "data": ' + data.decode("utf-8") + "}").encode("utf-8")
        headers = {"content-type": "application/cloudevents+json; charset=utf-8"}
    else:
        envelope = dict(attributes, data_base64=base64.b64encode(data).decode("ascii"))
        body = json.dumps(envelope).encode("utf-8")
        headers = {"content-type": "application/cloudevents+json"}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            print(response.status, response.headers.get("x-p2ptrain-reason", ""))
    except urllib.error.HTTPError as error:
        print(error.code, error.headers.get("x-p2ptrain-reason", ""))


main()
