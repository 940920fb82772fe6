#!/bin/sh
# Runs inside the pre-copy test guest (see tests/common/vm.rs): prepares
# what CRIU and runc need, runs the test command in /results/command, and
# powers off. Output goes to /results/out.txt, the exit code to /results/rc.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
# A fresh /run (netns, runc state); /tmp stays the host's as seen through
# the overlay: the test binary may live there (CI clones into /tmp).
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Soft-dirty tracks transparent huge pages whole: a few small writes would
# make every round as big as the first. (`ctmigrate check` warns of this.)
echo never > /sys/kernel/mm/transparent_hugepage/enabled
ip link set lo up
for m in nf_tables nft_compat nf_conntrack xt_conntrack xt_mark x_tables veth tun \
         unix_diag inet_diag tcp_diag udp_diag netlink_diag packet_diag; do
    modprobe "$m" 2>/dev/null
done
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root CTMIGRATE_REQUIRE_ROOT_TESTS=1 CTMIGRATE_IN_GUEST=1
{
    echo "guest: kernel $(uname -r), soft-lockup watchdog $(cat /proc/sys/kernel/watchdog_thresh) s, panics on lockup: $(cat /proc/sys/kernel/softlockup_panic)"
    . /results/command
} >/results/out.txt 2>&1
echo $? >/results/rc
sync
echo o >/proc/sysrq-trigger
