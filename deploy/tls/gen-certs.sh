#!/bin/sh
# Makes the CA and the certificates contiv's etcd needs, with openssl, into DIR (default
# ./contiv-etcd-tls), and prints the kubectl commands that store them as Secrets:
#   contiv-etcd-server-tls  ca.crt, tls.crt, tls.key  etcd's server certificate
#   contiv-etcd-client-tls  ca.crt, tls.crt, tls.key  the client certificate of agents and KSR
# The server certificate is valid for 127.0.0.1 (the NodePort every node uses), localhost,
# the Service names, and any extra names or addresses given as SANS (comma separated,
# e.g. SANS=DNS:etcd.example.com,IP:192.0.2.10 for an etcd outside the cluster).
# Keep ca.key somewhere safe (or delete it): it is needed only to issue more certificates.
set -eu
DIR=${1:-./contiv-etcd-tls}
DAYS=${DAYS:-3650}
SANS=${SANS:-}
mkdir -p "$DIR"
cd "$DIR"
umask 077

openssl req -x509 -newkey rsa:3072 -nodes -days "$DAYS" -subj "/CN=contiv-etcd-ca" \
  -keyout ca.key -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

server_sans="IP:127.0.0.1,DNS:localhost,DNS:contiv-etcd,DNS:contiv-etcd.contiv,DNS:contiv-etcd.contiv.svc"
server_sans="$server_sans,DNS:*.contiv-etcd-members.contiv.svc"
[ -n "$SANS" ] && server_sans="$server_sans,$SANS"

issue() { # name cn usage sans
  openssl req -newkey rsa:3072 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$3"
    [ -n "$4" ] && echo "subjectAltName=$4"
  } > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server contiv-etcd serverAuth "$server_sans"
issue client contiv-client clientAuth ""
rm -f ca.srl
chmod 600 ./*.key
chmod 644 ./*.crt

cat <<MSG
wrote $(pwd): ca.crt ca.key server.crt server.key client.crt client.key
kubectl -n contiv create secret generic contiv-etcd-server-tls \\
  --from-file=ca.crt=$(pwd)/ca.crt --from-file=tls.crt=$(pwd)/server.crt --from-file=tls.key=$(pwd)/server.key
kubectl -n contiv create secret generic contiv-etcd-client-tls \\
  --from-file=ca.crt=$(pwd)/ca.crt --from-file=tls.crt=$(pwd)/client.crt --from-file=tls.key=$(pwd)/client.key
MSG
