#!/bin/busybox sh
# /init of the relaynat test guest's initramfs (built by tests/support/vmguest.py).
#
# Loads the virtio-net driver, configures eth0 by DHCP (udhcpc), runs one shell
# command and powers off. Everything the host parses is a line on the serial console:
#   RN-LEASE ip=.. mask=.. router=.. mtu=.. dns=..   (from the udhcpc script, per lease)
#   RN-TIME <label> <seconds since kernel start>   (modules, dhcp, exit)
#   RN-DHCP-OK / RN-DHCP-FAIL
#   RN-BEGIN
#   ...the command's stdout and stderr...
#   RN-EXIT <status>
# The command comes from /rn/cmd (an initrd overlay, for long scripts) or else from
# rn.cmd=<base64> on the kernel command line. rn.dhcp=0 skips DHCP.
/bin/busybox mkdir -p /proc /sys /dev /tmp /etc /root /usr/bin /usr/sbin /sbin /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t tmpfs tmpfs /tmp
# Only emergencies on the console from here on, so kernel messages do not interleave
# with the command's output.
echo 1 > /proc/sys/kernel/printk
exec 0</dev/null >/dev/console 2>&1

rn_time() { read -r up _ </proc/uptime; echo "RN-TIME $1 $up"; }
rn_time init

for m in $(cat /lib/modules/load.list); do
    insmod "/lib/modules/$m.ko" || echo "RN-WARN insmod $m failed"
done

cmdline_arg() {  # cmdline_arg NAME -> value of NAME=... on the kernel command line
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

cat > /etc/udhcpc.script <<'SCRIPT'
#!/bin/sh
case "$1" in
deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "RN-LEASE ip=$ip mask=${mask:-} router=${router:-} mtu=${mtu:-} dns=${dns:-}" >/dev/console
    ;;
esac
exit 0
SCRIPT
chmod 755 /etc/udhcpc.script

ip link set lo up
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 50 ]; then echo "RN-WARN no eth0"; break; fi
    sleep 0.1
done
ip link set eth0 up
rn_time eth0

if [ "$(cmdline_arg rn.dhcp)" = "0" ]; then
    echo "RN-DHCP-SKIPPED"
elif udhcpc -i eth0 -s /etc/udhcpc.script -f -q -n -t 5 -T 2 -O mtu >/tmp/udhcpc.log 2>&1; then
    echo "RN-DHCP-OK"
else
    echo "RN-DHCP-FAIL"
    cat /tmp/udhcpc.log
fi

if [ -f /rn/cmd ]; then
    cp /rn/cmd /tmp/rn.cmd
elif b64=$(cmdline_arg rn.cmd); then
    echo "$b64" | base64 -d > /tmp/rn.cmd
else
    echo "true" > /tmp/rn.cmd
fi

rn_time dhcp
echo "RN-BEGIN"
cd /root
sh /tmp/rn.cmd
status=$?
echo "RN-EXIT $status"
rn_time exit
sync
poweroff -f
# Not reached; if it were, the kernel panics on init's exit and panic=-1 plus
# qemu's -no-reboot end the VM anyway.
