#!/bin/sh
# Starts the viewer's proxy: the container's DNS server (compose's, from resolv.conf) into
# viewer-proxy.conf.in, then nginx in the foreground, its log on stderr.
set -eu
resolver=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
sed "s/@RESOLVER@/$resolver/" /etc/nginx/viewer-proxy.conf.in > /tmp/nginx.conf
exec nginx -e stderr -c /tmp/nginx.conf -g 'daemon off;'
