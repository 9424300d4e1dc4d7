#!/bin/sh
# Self-signed certificates for trying TLS on one machine (prototyping only; use your
# organisation's CA for a real deployment). Writes certificates/{ca.crt,server.pem,server.key}
# for the SuperLink at 127.0.0.1/localhost; add its real host name or IP to SAN below.
set -e
SAN="${SAN:-DNS:localhost,IP:127.0.0.1}"
mkdir -p certificates && cd certificates
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout ca.key -out ca.crt -subj "/CN=fedsim-flower-ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=%s\n" "$SAN" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -out server.pem -extfile san.ext 2>/dev/null
rm -f server.csr san.ext ca.srl
echo "certificates/: ca.crt (give to SuperNodes and flwr), server.pem + server.key (SuperLink)"
