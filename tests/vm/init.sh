#!/bin/busybox sh
# initramfs /init of the pre-copy test guest: root = overlay of the host's
# / (9p, read-only) under a tmpfs, kernel modules from the unpacked Debian
# kernel, then switch_root to run /results/guest.sh.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         netfs fscache 9pnet 9pnet_virtio 9p overlay; do
    insmod /modules/$m.ko 2>/dev/null
done
opts=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /host /upper /newroot
mount -t 9p -o $opts,ro hostroot /host || { echo "guest: cannot mount the host root"; poweroff -f; }
mount -t tmpfs -o size=80% tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w /newroot
mkdir -p /newroot/usr/lib/modules /newroot/results
mount -t 9p -o $opts,ro modules /newroot/usr/lib/modules
mount -t 9p -o $opts results /newroot/results
umount /proc /sys /dev
exec switch_root /newroot /bin/sh /results/guest.sh
echo "guest: switch_root failed"
poweroff -f
