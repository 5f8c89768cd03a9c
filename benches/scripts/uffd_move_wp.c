/*
 * Does UFFDIO_MOVE keep a page's userfaultfd write-protect bit? Dirty tracking by WP_ASYNC with
 * PAGEMAP_SCAN could evict without losing writes only if it does: eviction would move a page out
 * (no write can reach it after) and then ask whether it was written since it was protected.
 * Installs 4 pages write-protected (WP_ASYNC), writes 2 of them, moves all 4 to a second
 * registered range and scans that for written pages: 2 means the bit travels, 4 that it is
 * dropped (Linux 6.18.44: 4).
 *   cc -O2 -o uffd_move_wp benches/scripts/uffd_move_wp.c && ./uffd_move_wp
 * Needs /dev/userfaultfd or unprivileged userfaultfd, Linux 6.8 or later (UFFDIO_MOVE).
 */
#define _GNU_SOURCE
#include <linux/userfaultfd.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct page_region { unsigned long long start, end, categories; };
struct pm_scan_arg { unsigned long long size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask, category_anyof_mask, return_mask; };
#define PM_SCAN_WP_MATCHING 1
#define PM_SCAN_CHECK_WPASYNC 2
#define PAGE_IS_WPALLOWED 1
#define PAGE_IS_WRITTEN 2
#define PAGE_IS_FILE 4
#define PAGE_IS_PRESENT 8
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#define UFFD_FEATURE_WP_ASYNC (1<<15)
#define UFFD_FEATURE_MOVE (1<<16)
struct uffdio_move { unsigned long long dst, src, len, mode; long long move; };
#define UFFDIO_MOVE _IOWR(UFFDIO, 0x05, struct uffdio_move)
#define PG 4096
static int uffd;
static void reg(void *p, size_t n){ struct uffdio_register r={.range={(unsigned long)p,n},.mode=UFFDIO_REGISTER_MODE_MISSING|UFFDIO_REGISTER_MODE_WP}; if(ioctl(uffd,UFFDIO_REGISTER,&r)){perror("reg");exit(1);} }
static int scan_written(int pm, void *p, size_t n, int reprotect){
  struct page_region out[16]; struct pm_scan_arg a={0};
  a.size=sizeof a; a.start=(unsigned long)p; a.end=(unsigned long)p+n; a.vec=(unsigned long)out; a.vec_len=16;
  a.flags = reprotect? (PM_SCAN_WP_MATCHING|PM_SCAN_CHECK_WPASYNC):0;
  a.category_mask=PAGE_IS_WRITTEN; a.return_mask=PAGE_IS_WRITTEN|PAGE_IS_PRESENT;
  long rc=ioctl(pm,PAGEMAP_SCAN,&a); if(rc<0){perror("scan");exit(1);}
  int cnt=0; for(int i=0;i<rc;i++) cnt+=(out[i].end-out[i].start)/PG; return cnt;
}
int main(){
  uffd=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK);
  struct uffdio_api api={.api=UFFD_API,.features=UFFD_FEATURE_WP_ASYNC|UFFD_FEATURE_MOVE|UFFD_FEATURE_WP_UNPOPULATED};
  if(ioctl(uffd,UFFDIO_API,&api)){perror("api");return 1;}
  int pm=open("/proc/self/pagemap",O_RDONLY);
  char *reg_=mmap(0,4*PG,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  char *stg=mmap(0,4*PG,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  reg(reg_,4*PG); reg(stg,4*PG);
  char *src=mmap(0,4*PG,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); memset(src,7,4*PG);
  struct uffdio_copy c={.dst=(unsigned long)reg_,.src=(unsigned long)src,.len=4*PG,.mode=UFFDIO_COPY_MODE_WP};
  if(ioctl(uffd,UFFDIO_COPY,&c)){perror("copy");return 1;}
  printf("after copy wp: written=%d\n",scan_written(pm,reg_,4*PG,0));
  reg_[PG*1]=1; reg_[PG*3]=1;
  printf("after writes to 1,3: written=%d\n",scan_written(pm,reg_,4*PG,0));
  struct uffdio_move m={.dst=(unsigned long)stg,.src=(unsigned long)reg_,.len=4*PG,.mode=0};
  if(ioctl(uffd,UFFDIO_MOVE,&m)){perror("move");return 1;}
  printf("moved %lld bytes; written pages after the move: %d (2: the bit travels, 4: dropped)\n",(long long)m.move,scan_written(pm,stg,4*PG,0));
  return 0;
}
