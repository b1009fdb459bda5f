#!/bin/sh
# Event script for busybox udhcpc (installed as /usr/share/udhcpc/default.script).
#
# udhcpc runs it as `default.script EVENT` with the lease in the environment:
# interface, ip, mask (prefix length), broadcast, router, dns, domain, mtu.
# Events: deconfig (drop the address), bound and renew (apply the lease),
# leasefail and nak (only reported). All commands are busybox applets.

RESOLV_CONF=${RESOLV_CONF:-/etc/resolv.conf}

log() {
    printf '[udhcpc] %s\n' "$*"
}

set_address() {
    if ip -4 addr show dev "$interface" | grep -q "inet $ip/${mask:-32} "; then
        return 0
    fi
    ip -4 addr flush dev "$interface"
    if [ -n "$broadcast" ]; then
        ip -4 addr add "$ip/${mask:-32}" broadcast "$broadcast" dev "$interface"
    else
        ip -4 addr add "$ip/${mask:-32}" dev "$interface"
    fi
}

set_routes() {
    tries=0
    while [ "$tries" -lt 16 ] && ip -4 route del default dev "$interface" 2>/dev/null; do
        tries=$((tries + 1))
    done
    metric=0
    for gateway in $router; do
        ip -4 route add default via "$gateway" dev "$interface" metric "$metric"
        metric=$((metric + 1))
    done
}

set_resolver() {
    [ -n "$dns" ] || return 0
    tmp="$RESOLV_CONF.$$"
    {
        if [ -n "$domain" ]; then
            printf 'search %s\n' "$domain"
        fi
        for server in $dns; do
            printf 'nameserver %s\n' "$server"
        done
    } > "$tmp" && mv -f "$tmp" "$RESOLV_CONF"
}

case "$1" in
    deconfig)
        ip link set dev "$interface" up
        ip -4 addr flush dev "$interface"
        ;;
    bound | renew)
        if [ -n "$mtu" ]; then
            ip link set dev "$interface" mtu "$mtu"
        fi
        set_address
        set_routes
        set_resolver
        log "$interface: $ip/${mask:-32} router ${router:-none} dns ${dns:-none}"
        ;;
    leasefail | nak)
        log "$interface: $1 ${message:-}"
        ;;
esac
exit 0
