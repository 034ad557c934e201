"""Cross-check gearmesh-auth against PyJWT (an independent implementation).

Reads a JSON list of jobs on stdin and prints a JSON list of results, one per job:
  {"mode": "mint", "alg": A, "key": FILE, "aud": AUD, "kid": KID or null}  -> the token
  {"mode": "verify", "alg": A, "key": FILE or JWK object, "aud": AUD, "token": T} -> the subject
"""
import json
import sys
import time

import jwt


def key_material(alg, key):
    if isinstance(key, dict):
        return jwt.PyJWK(key, algorithm=alg).key
    data = open(key, "rb").read()
    return data.strip() if alg.startswith("HS") else data


def run(job):
    alg = job["alg"]
    key = key_material(alg, job["key"])
    if job["mode"] == "mint":
        now = int(time.time())
        claims = {"sub": "py-" + alg, "iat": now, "nbf": now, "exp": now + 600, "aud": job["aud"],
                  "iss": "pyjwt", "scope": "call:billing/charge observe", "jti": "j1"}
        headers = {"kid": job["kid"]} if job.get("kid") else None
        return jwt.encode(claims, key, algorithm=alg, headers=headers)
    if job["mode"] == "verify":
        claims = jwt.decode(job["token"], key, algorithms=[alg], audience=job["aud"],
                            options={"require": ["exp", "iat", "sub"]})
        return claims["sub"]
    raise SystemExit("unknown mode " + job["mode"])


if __name__ == "__main__":
    print(json.dumps([run(job) for job in json.load(sys.stdin)]))
